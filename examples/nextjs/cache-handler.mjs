// Next.js' "use cache" entries in Redis, in evictd's layout: a database edit evictd sees makes
// them stale like any other entry tagged with the same tags.
import { Redis } from "ioredis";
import { createCacheHandler } from "@evictd/cache";

export default createCacheHandler({
  redis: new Redis(process.env.REDIS_URL ?? "redis://127.0.0.1:6379", { maxRetriesPerRequest: 1 }),
});
