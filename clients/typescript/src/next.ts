// A Next.js `cacheHandlers` handler ("use cache", Next.js 15/16) on evictd's contract: an entry
// is stored under `{prefix}next:{cacheKey}` and listed in the tag set of each of its
// `cacheTag(...)` tags, so evictd's invalidation of a tag removes it like any other entry; the
// tags' `tagts` markers are its expiration times (`getExpiration`), and Next's own
// `revalidateTag` (`updateTags`) invalidates through the same Lua as the daemon. Shared by every
// instance of the application through Redis; Redis down is a cache miss, never an error page.
//
//     // cache-handler.mjs, named in next.config: cacheHandlers: { default: "./cache-handler.mjs" }
//     import { Redis } from "ioredis";
//     import { createCacheHandler } from "@evictd/cache/next";
//     export default createCacheHandler({ redis: new Redis(process.env.REDIS_URL) });

import type { Redis } from "ioredis";

import { EvictdCache, type EvictdCacheOptions } from "./cache.js";

/** Next.js' cache entry (`next/dist/server/lib/cache-handlers/types`). */
export interface CacheEntry {
  value: ReadableStream<Uint8Array>;
  tags: string[];
  stale: number;
  timestamp: number;
  expire: number;
  revalidate: number;
}

/** Next.js' `cacheHandlers` interface. */
export interface CacheHandler {
  get(cacheKey: string, softTags: string[]): Promise<undefined | CacheEntry>;
  set(cacheKey: string, pendingEntry: Promise<CacheEntry>): Promise<void>;
  refreshTags(): Promise<void>;
  getExpiration(tags: string[]): Promise<number>;
  updateTags(tags: string[], durations?: { expire?: number }): Promise<void>;
}

/** What is stored: the entry without its stream, and the stream's bytes. */
interface Stored {
  tags: string[];
  stale: number;
  timestamp: number;
  expire: number;
  revalidate: number;
  body: string;
}

export interface CacheHandlerOptions extends EvictdCacheOptions {
  redis: Redis;
}

/** Longest an entry lives in Redis whatever its `expire` (Next uses "never" for some). */
const MAX_TTL_SECONDS = 30 * 86_400;

export function createCacheHandler(options: CacheHandlerOptions): CacheHandler {
  const cache = new EvictdCache(options.redis, options);
  const pending = new Map<string, Promise<void>>();
  const key = (cacheKey: string) => `next:${cacheKey}`;
  const warn = options.warn ?? ((m: string) => console.warn(m));

  return {
    async get(cacheKey, softTags) {
      await pending.get(cacheKey);
      const stored = await cache.get<Stored>(key(cacheKey));
      if (!stored) return undefined;
      if (softTags.length > 0 && (await expiration(cache, softTags)) >= stored.timestamp) {
        return undefined;
      }
      const bytes = Buffer.from(stored.body, "base64");
      return {
        value: new ReadableStream<Uint8Array>({
          start(controller) {
            controller.enqueue(new Uint8Array(bytes));
            controller.close();
          },
        }),
        tags: stored.tags,
        stale: stored.stale,
        timestamp: stored.timestamp,
        expire: stored.expire,
        revalidate: stored.revalidate,
      };
    },

    async set(cacheKey, pendingEntry) {
      let done = () => {};
      pending.set(cacheKey, new Promise<void>((resolve) => (done = resolve)));
      try {
        // Redis' clock before the entry's data is read (it may still be rendering), so an
        // invalidation while it renders makes the write a no-op.
        let since: number | undefined;
        let skew = 0;
        try {
          since = await cache.now();
          skew = since - Date.now();
        } catch {
          since = undefined;
        }
        const entry = await pendingEntry;
        const chunks: Uint8Array[] = [];
        const reader = entry.value.getReader();
        for (;;) {
          const { done: finished, value } = await reader.read();
          if (finished) break;
          chunks.push(value);
        }
        if (since === undefined) return;
        since = Math.min(since, entry.timestamp + skew);
        const stored: Stored = {
          tags: entry.tags,
          stale: entry.stale,
          timestamp: entry.timestamp,
          expire: entry.expire,
          revalidate: entry.revalidate,
          body: Buffer.concat(chunks).toString("base64"),
        };
        const ttl = Math.max(1, Math.min(entry.expire, MAX_TTL_SECONDS));
        await cache.set(key(cacheKey), stored, entry.tags, ttl, { since });
      } catch (error) {
        // A stream that errored part-way is not kept; the page already has its error.
        warn(`evictd cache handler: entry ${cacheKey} not stored: ${String(error)}`);
      } finally {
        pending.delete(cacheKey);
        done();
      }
    },

    async refreshTags() {
      // Markers are read from Redis when asked: there is no local manifest to refresh.
    },

    async getExpiration(tags) {
      return expiration(cache, tags);
    },

    async updateTags(tags) {
      try {
        await cache.invalidate(tags);
      } catch (error) {
        warn(`evictd cache handler: revalidating ${tags.join(", ")} failed: ${String(error)}`);
      }
    },
  };
}

/** The latest invalidation time of `tags` (their `tagts` markers, ms), 0 when none or when Redis
 * does not answer. */
async function expiration(cache: EvictdCache, tags: string[]): Promise<number> {
  if (tags.length === 0) return 0;
  try {
    const stamps = await cache.redis.mget(...tags.map((t) => `${cache.prefix}tagts:${t}`));
    return Math.max(0, ...stamps.map((s) => (s === null ? 0 : Number(s) || 0)));
  } catch {
    return 0;
  }
}
