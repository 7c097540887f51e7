// `evictd stats` from the application's side: the same walk of the keyspace (SCAN, a page at a
// time; each tag set by SSCAN/ZSCAN), the same field names and recommendations. The outbox
// backlog, which needs the database, is left to `evictd stats`.

import type { Redis } from "ioredis";

import { escapeGlob } from "./rules.js";

export interface CacheStats {
  totalEntries: number;
  expiredEntries: number;
  hitRate: number;
  keyspaceHits: number;
  keyspaceMisses: number;
  tagSets: number;
  tagMembers: number;
  tagSetsDraining: number;
  invalidations: { batches: number; tags: number; keys: number; sweptMembers: number };
  recommendations: {
    hit_rate_status: "excellent" | "good" | "needs_improvement";
    expired_entries_status: "high" | "normal";
  };
}

/** Percent of keyspace lookups that hit, two decimals; 0 without traffic. */
export function hitRate(hits: number, misses: number): number {
  const total = hits + misses;
  return total === 0 ? 0 : Math.round((hits * 10_000) / total) / 100;
}

export function hitRateStatus(rate: number): CacheStats["recommendations"]["hit_rate_status"] {
  return rate > 80 ? "excellent" : rate > 60 ? "good" : "needs_improvement";
}

export function expiredEntriesStatus(expired: number, total: number): "high" | "normal" {
  return expired > total * 0.3 ? "high" : "normal";
}

export async function cacheStats(redis: Redis, prefix: string): Promise<CacheStats> {
  let totalEntries = 0;
  let tagSets = 0;
  let tagMembers = 0;
  let expiredEntries = 0;
  let draining = 0;
  const pattern = `${escapeGlob(prefix)}*`;
  let cursor = "0";
  do {
    const [next, keys] = await redis.scan(cursor, "MATCH", pattern, "COUNT", 1000);
    cursor = next;
    for (const key of keys) {
      const rest = key.slice(prefix.length);
      if (rest.startsWith("tag:")) {
        tagSets += 1;
        const [members, missing] = await countMembers(redis, key);
        tagMembers += members;
        expiredEntries += missing;
      } else if (rest.startsWith("drain:")) {
        draining += 1;
      } else if (!["tagts:", "tagts-table:", "evictd:"].some((own) => rest.startsWith(own))) {
        totalEntries += 1;
      }
    }
  } while (cursor !== "0");
  const info = await redis.info("stats");
  const field = (name: string) => Number(new RegExp(`^${name}:(\\d+)`, "m").exec(info)?.[1] ?? 0);
  const keyspaceHits = field("keyspace_hits");
  const keyspaceMisses = field("keyspace_misses");
  const counters = await redis.hgetall(`${prefix}evictd:stats`);
  const counter = (name: string) => Number(counters[name] ?? 0);
  const rate = hitRate(keyspaceHits, keyspaceMisses);
  return {
    totalEntries,
    expiredEntries,
    hitRate: rate,
    keyspaceHits,
    keyspaceMisses,
    tagSets,
    tagMembers,
    tagSetsDraining: draining,
    invalidations: {
      batches: counter("invalidations"),
      tags: counter("tags"),
      keys: counter("keys"),
      sweptMembers: counter("swept"),
    },
    recommendations: {
      hit_rate_status: hitRateStatus(rate),
      expired_entries_status: expiredEntriesStatus(expiredEntries, totalEntries),
    },
  };
}

/** (members, members whose entry is gone) of one tag set, a page at a time. */
async function countMembers(redis: Redis, key: string): Promise<[number, number]> {
  const kind = await redis.type(key);
  if (kind !== "set" && kind !== "zset") return [0, 0];
  let members = 0;
  let missing = 0;
  let cursor = "0";
  do {
    const [next, items] =
      kind === "set"
        ? await redis.sscan(key, cursor, "COUNT", 1000)
        : await redis.zscan(key, cursor, "COUNT", 1000);
    cursor = next;
    const page = kind === "set" ? items : items.filter((_, i) => i % 2 === 0);
    if (page.length > 0) {
      members += page.length;
      missing += page.length - (await redis.exists(...page));
    }
  } while (cursor !== "0");
  return [members, missing];
}
