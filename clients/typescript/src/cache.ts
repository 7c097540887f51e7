// The application's half of evictd's cache contract, on one Redis (ioredis):
//
// - an entry `{prefix}{key}` is listed in the set `{prefix}tag:{tag}` of each of its tags;
// - an invalidation removes a tag's entries and stamps `{prefix}tagts:{tag}` with Redis' clock
//   (ms); a table-wide one stamps `{prefix}tagts-table:{schema.table}`;
// - an entry remembers when the data it holds was read (`at`, Redis' clock, taken before the
//   database read) and its tags — stored as `at \n tags (JSON) \n value (JSON)` — and is
//   refused (never written, or removed when found) once a marker of one of its tags, or of a
//   table that makes them, is not older than that.
//
// Invalidation runs the daemon's own Lua (`lua/`, kept equal to the daemon's by its tests), so
// manual and automatic invalidation are one mechanism. Redis being down makes reads a miss and
// writes a no-op, with one warning until it answers again: a cache must never fail a page.

import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";

import type { Redis } from "ioredis";

import { escapeGlob, tablesOfTag, tableWide, type TableRule, DEFAULT_RULES } from "./rules.js";
import { cacheStats, type CacheStats } from "./stats.js";

const lua = (name: string) => readFileSync(new URL(`../../lua/${name}.lua`, import.meta.url), "utf8");

/** Writes an entry and its memberships at once, unless a marker says the data is stale.
 * KEYS: the entry, n tag sets, then markers. ARGV: value, ttl ms, n, read time ms ('' = now). */
const WRITE = `
local n = tonumber(ARGV[3])
local at = ARGV[4]
if at == '' then
  local clock = redis.call('TIME')
  at = clock[1] .. string.format('%03d', math.floor(tonumber(clock[2]) / 1000))
else
  for i = 2 + n, #KEYS do
    local marker = tonumber(redis.call('GET', KEYS[i]) or '')
    if marker and marker >= tonumber(at) then
      return 0
    end
  end
end
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], at .. '\\n' .. ARGV[1], 'PX', ttl)
for i = 2, 1 + n do
  redis.call('SADD', KEYS[i], KEYS[1])
  local left = redis.call('PTTL', KEYS[i])
  if (left == -1 and redis.call('SCARD', KEYS[i]) == 1) or (left >= 0 and left < ttl) then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return 1
`;

/** Redis' clock in ms. */
const NOW = `
local clock = redis.call('TIME')
return clock[1] * 1000 + math.floor(tonumber(clock[2]) / 1000)
`;

export interface EvictdCacheOptions {
  /** The daemon's `key_prefix` (default `cache:`). */
  prefix?: string;
  /** Members removed per Redis call when draining a big tag (the daemon's `drain_chunk`). */
  drainChunk?: number;
  /** Lifetime of `tagts` markers, seconds (the daemon's `tagts_ttl_secs`). */
  tagtsTtlSeconds?: number;
  /** The rules that map tags to tables (the daemon's defaults unless configured otherwise). */
  rules?: readonly TableRule[];
  /** Where the one warning per Redis outage goes (default `console.warn`). */
  warn?: (message: string) => void;
}

/** What an invalidation did. */
export interface InvalidationReport {
  tags: number;
  keys: number;
}

/** Thrown for a tag name the contract cannot carry. */
export class InvalidTagError extends TypeError {
  constructor(tag: string, why: string) {
    super(`evictd: invalid tag ${JSON.stringify(tag)}: ${why}`);
    this.name = "InvalidTagError";
  }
}

/** Refuses tag names that are empty or carry control characters (a newline would split the
 * daemon's log lines and the tags of `evictd.invalidate_tags`). */
export function checkTag(tag: string): void {
  if (typeof tag !== "string" || tag.length === 0) throw new InvalidTagError(String(tag), "empty");
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(tag)) {
    throw new InvalidTagError(tag, "contains a control character (newline, tab, NUL…)");
  }
}

export class EvictdCache {
  readonly prefix: string;
  private readonly drainChunk: number;
  private readonly tagtsTtlMs: number;
  private readonly rules: readonly TableRule[];
  private readonly warn: (message: string) => void;
  private outage = false;

  constructor(
    readonly redis: Redis,
    options: EvictdCacheOptions = {},
  ) {
    this.prefix = options.prefix ?? "cache:";
    this.drainChunk = options.drainChunk ?? 250;
    this.tagtsTtlMs = (options.tagtsTtlSeconds ?? 86_400) * 1000;
    this.rules = options.rules ?? DEFAULT_RULES;
    this.warn = options.warn ?? ((m) => console.warn(m));
    // ioredis prints every connection error of a client without an `error` listener, at each
    // reconnect attempt; the failed calls already say it, once per outage.
    if (redis.listenerCount("error") === 0) redis.on("error", () => {});
    redis.defineCommand("evictdWrite", { lua: WRITE });
    redis.defineCommand("evictdNow", { numberOfKeys: 0, lua: NOW });
    redis.defineCommand("evictdDetach", { numberOfKeys: 0, lua: lua("detach") });
    redis.defineCommand("evictdDrain", { numberOfKeys: 2, lua: lua("drain") });
    redis.defineCommand("evictdStamp", { lua: lua("stamp") });
  }

  /** Redis' clock, ms: take it before reading the database, and hand it to `set` as `since`. */
  async now(): Promise<number> {
    return Number(await this.call("evictdNow"));
  }

  /** Writes `value` (JSON) under `key` with `tags`, both for `ttlSeconds`. With `since` (the
   * time before the database read, from `now()`), refuses to write when one of the tags, or a
   * table making them, was invalidated since: returns false. Redis down: false, one warning. */
  async set(
    key: string,
    value: unknown,
    tags: readonly string[],
    ttlSeconds: number,
    options: { since?: number } = {},
  ): Promise<boolean> {
    tags.forEach(checkTag);
    const entry = this.prefix + key;
    const markers = this.markersOf(tags);
    const keys = [entry, ...tags.map((t) => this.tagKey(t)), ...markers];
    try {
      const written = await this.call(
        "evictdWrite",
        keys.length,
        ...keys,
        `${JSON.stringify(tags)}\n${JSON.stringify(value)}`,
        Math.round(ttlSeconds * 1000),
        tags.length,
        options.since === undefined ? "" : String(options.since),
      );
      this.answered();
      return Number(written) === 1;
    } catch (error) {
      this.failed(error);
      return false;
    }
  }

  /** The value under `key`, or `undefined` when there is none, when it was read before an
   * invalidation of one of its tags (it is removed then), or, with `since`, before that time.
   * Redis down: `undefined`, one warning. */
  async get<T = unknown>(key: string, options: { since?: number } = {}): Promise<T | undefined> {
    const entry = this.prefix + key;
    try {
      const raw = await this.redis.get(entry);
      this.answered();
      if (raw === null) return undefined;
      const [atText, tagsText, valueText] = splitEntry(raw);
      const at = Number(atText);
      if (!Number.isFinite(at) || tagsText === undefined || valueText === undefined) {
        return undefined;
      }
      if (options.since !== undefined && at < options.since) return undefined;
      const markers = this.markersOf(JSON.parse(tagsText) as string[]);
      if (markers.length > 0) {
        const stamps = await this.redis.mget(...markers);
        if (stamps.some((s) => s !== null && Number(s) >= at)) {
          await this.redis.unlink(entry);
          return undefined;
        }
      }
      return JSON.parse(valueText) as T;
    } catch (error) {
      this.failed(error);
      return undefined;
    }
  }

  /** The value under `key`, or `loader()`'s, cached with `tags` for `ttlSeconds` unless an
   * invalidation of them happened while it loaded (then returned, not cached). */
  async cached<T>(
    key: string,
    tags: readonly string[],
    loader: () => Promise<T>,
    ttlSeconds: number,
  ): Promise<T> {
    tags.forEach(checkTag);
    const hit = await this.get<T>(key);
    if (hit !== undefined) return hit;
    let since: number | undefined;
    try {
      since = await this.now();
    } catch (error) {
      this.failed(error);
      return loader();
    }
    const value = await loader();
    await this.set(key, value, tags, ttlSeconds, { since });
    return value;
  }

  /** Invalidates `tags` as the daemon does: each tag's entries removed (a big set detached and
   * drained in bounded chunks), its `tagts` marker stamped. Throws when Redis is down: the
   * caller asked for a removal it must know did not happen. */
  async invalidate(tags: readonly string[]): Promise<InvalidationReport> {
    tags.forEach(checkTag);
    const unique = [...new Set(tags)];
    const report: InvalidationReport = { tags: unique.length, keys: 0 };
    const nonce = randomBytes(8).toString("hex");
    // The scripts add their work to the running totals themselves; the first call counts
    // this invalidation too.
    if (unique.length === 0) await this.count({ invalidations: 1 });
    let invalidations = 1;
    let pending = unique;
    while (pending.length > 0) {
      const run = pending.slice(0, 200);
      const out = (await this.call(
        "evictdDetach",
        this.drainChunk,
        this.tagtsTtlMs,
        this.prefix,
        nonce,
        0,
        invalidations,
        ...run,
      )) as number[];
      invalidations = 0;
      const processed = Math.max(1, Number(out[0]));
      report.keys += Number(out[1]);
      for (const position of out.slice(2)) {
        if (position > 0) {
          const tag = run[position - 1];
          if (tag !== undefined) report.keys += await this.drain(`${this.prefix}drain:${nonce}:${tag}`);
        } else {
          report.tags -= 1;
        }
      }
      pending = [...run.slice(processed), ...pending.slice(run.length)];
    }
    return report;
  }

  /** Invalidates every tag `table`'s rows can make (a SCAN per tag family) and stamps the
   * table's marker, as the daemon's table-wide invalidation does. */
  async invalidateTable(table: string): Promise<InvalidationReport> {
    const { tags, globs } = tableWide(table, this.rules);
    const found = new Set(tags);
    for (const glob of globs) {
      const tagPrefix = `${this.prefix}tag:`;
      let cursor = "0";
      do {
        const [next, keys] = await this.redis.scan(cursor, "MATCH", `${escapeGlob(tagPrefix)}${glob}`, "COUNT", 1000);
        for (const key of keys) found.add(key.slice(tagPrefix.length));
        cursor = next;
      } while (cursor !== "0");
    }
    const report = found.size > 0 ? await this.invalidate([...found]) : { tags: 0, keys: 0 };
    const rule = this.rules.find((r) => r.table === table || r.table === `public.${table}`);
    await this.call("evictdStamp", 1, `${this.prefix}tagts-table:${rule?.table ?? table}`, this.tagtsTtlMs);
    return report;
  }

  /** What `evictd stats` reports of this cache (same fields and `recommendations`; the outbox,
   * which needs the database, aside). */
  stats(): Promise<CacheStats> {
    return cacheStats(this.redis, this.prefix);
  }

  private async drain(key: string): Promise<number> {
    let removed = 0;
    for (;;) {
      const [n, left] = (await this.call("evictdDrain", key, this.statsKey(), this.drainChunk)) as [number, number];
      removed += Number(n);
      if (Number(left) === 0) return removed;
    }
  }

  /** Adds to the running totals `evictd stats` reports. */
  private async count(fields: Record<string, number>): Promise<void> {
    const pipeline = this.redis.pipeline();
    for (const [field, n] of Object.entries(fields)) pipeline.hincrby(this.statsKey(), field, n);
    await pipeline.exec();
  }

  private statsKey(): string {
    return `${this.prefix}evictd:stats`;
  }

  tagKey(tag: string): string {
    return `${this.prefix}tag:${tag}`;
  }

  /** The markers that make an entry with `tags` stale: each tag's and its tables'. */
  private markersOf(tags: readonly string[]): string[] {
    const markers = new Set<string>();
    for (const tag of tags) {
      markers.add(`${this.prefix}tagts:${tag}`);
      for (const table of tablesOfTag(tag, this.rules)) markers.add(`${this.prefix}tagts-table:${table}`);
    }
    return [...markers];
  }

  private call(command: string, ...args: (string | number)[]): Promise<unknown> {
    const redis = this.redis as unknown as Record<string, (...a: (string | number)[]) => Promise<unknown>>;
    const fn = redis[command];
    if (!fn) throw new Error(`evictd: command ${command} not defined`);
    return fn.apply(this.redis, args);
  }

  private answered(): void {
    this.outage = false;
  }

  private failed(error: unknown): void {
    if (error instanceof InvalidTagError) throw error;
    if (!this.outage) {
      this.outage = true;
      this.warn(`evictd cache: Redis unavailable, serving without the cache: ${String(error)}`);
    }
  }
}

/** An entry's three parts: read time, tags (JSON), value (JSON); the value may hold newlines
 * only escaped (JSON), the tags none (refused). */
function splitEntry(raw: string): [string, string | undefined, string | undefined] {
  const first = raw.indexOf("\n");
  if (first < 0) return [raw, undefined, undefined];
  const second = raw.indexOf("\n", first + 1);
  if (second < 0) return [raw.slice(0, first), undefined, undefined];
  return [raw.slice(0, first), raw.slice(first + 1, second), raw.slice(second + 1)];
}

