import { Redis } from "ioredis";
import { EvictdCache } from "@evictd/cache";

const globalCache = globalThis as unknown as { evictdCache?: EvictdCache };

/** One cache per server process (Next may load this module more than once). */
export const cache: EvictdCache = (globalCache.evictdCache ??= new EvictdCache(
  new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379", { maxRetriesPerRequest: 1 }),
));
