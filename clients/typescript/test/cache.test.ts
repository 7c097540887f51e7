// The package against a real Redis: the contract's writes, stale-read refusal, invalidation as
// the daemon does it, errors the application can act on.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Redis } from "ioredis";

import { EvictdCache, InvalidTagError, createCacheInvalidation } from "../src/index.js";
import { RedisServer, freePort } from "./support.js";

let server: RedisServer;
let redis: Redis;
let n = 0;

/** A cache under a prefix of its own, so tests do not see each other's keys. */
function fresh(options: { drainChunk?: number } = {}): EvictdCache {
  n += 1;
  return new EvictdCache(redis, { prefix: `t${n}:`, ...options });
}

before(async () => {
  server = await RedisServer.start();
  redis = server.client();
});

after(() => {
  redis.disconnect();
  server.stop();
});

test("an entry and its tag sets are written together, both with the TTL", async () => {
  const cache = fresh();
  assert.equal(await cache.set("p:1", { name: "one" }, ["products:id:1", "products:all"], 60), true);
  assert.deepEqual(await cache.get("p:1"), { name: "one" });
  assert.deepEqual(await redis.smembers(`${cache.prefix}tag:products:id:1`), [`${cache.prefix}p:1`]);
  for (const key of [`${cache.prefix}p:1`, `${cache.prefix}tag:products:all`]) {
    const ttl = await redis.pttl(key);
    assert.ok(ttl > 50_000 && ttl <= 60_000, `${key}: ${ttl}`);
  }
  // A longer-lived entry extends its tag sets; a shorter one does not shorten them.
  await cache.set("p:2", 2, ["products:all"], 120);
  await cache.set("p:3", 3, ["products:all"], 10);
  assert.ok((await redis.pttl(`${cache.prefix}tag:products:all`)) > 110_000);
});

test("cached() loads once, then serves from Redis", async () => {
  const cache = fresh();
  let loads = 0;
  const loader = async () => {
    loads += 1;
    return { rows: [1, 2, 3] };
  };
  assert.deepEqual(await cache.cached("list", ["products:all"], loader, 60), { rows: [1, 2, 3] });
  assert.deepEqual(await cache.cached("list", ["products:all"], loader, 60), { rows: [1, 2, 3] });
  assert.equal(loads, 1);
});

test("a value read before an invalidation is never written back (the race)", async () => {
  const cache = fresh();
  let loads = 0;
  const value = await cache.cached(
    "slow",
    ["products:client:42"],
    async () => {
      loads += 1;
      // The edit commits, and is invalidated, while the slow read is under way.
      await cache.invalidate(["products:client:42"]);
      return "old";
    },
    60,
  );
  assert.equal(value, "old", "the caller still gets its value");
  assert.equal(await redis.exists(`${cache.prefix}slow`), 0, "but it is not cached");
  // A read that starts in the invalidation's own millisecond is refused too (which came first
  // cannot be told): the next read starts once Redis' clock has passed the marker.
  const marker = Number(await redis.get(`${cache.prefix}tagts:products:client:42`));
  const deadline = Date.now() + 5_000;
  while ((await cache.now()) <= marker) assert.ok(Date.now() < deadline, "Redis' clock stands still");
  await cache.cached("slow", ["products:client:42"], async () => (loads += 1, "new"), 60);
  assert.equal(await cache.get("slow"), "new");
  assert.equal(loads, 2);
});

test("an entry older than a marker of its tags or of their table is refused and removed", async () => {
  const cache = fresh();
  const since = await cache.now();
  await cache.set("c:1", "v", ["products:client:1"], 60, { since });
  assert.equal(await cache.get("c:1"), "v");
  // Someone else's write of the marker (the daemon's table-wide invalidation of products).
  await redis.set(`${cache.prefix}tagts-table:public.products`, String(Date.now() + 1000));
  assert.equal(await cache.get("c:1"), undefined);
  assert.equal(await redis.exists(`${cache.prefix}c:1`), 0, "removed when found stale");
  assert.equal(await cache.set("c:1", "v", ["products:client:1"], 60, { since }), false);
  // Other tables' entries are not concerned.
  await cache.set("m:1", "v", ["module_content:id:1"], 60, { since });
  assert.equal(await cache.get("m:1"), "v");
  assert.equal(await cache.get("m:1", { since: since + 60_000 }), undefined, "older than asked");
});

test("invalidate() removes a big tag's entries in chunks and keeps the others", async () => {
  const cache = fresh({ drainChunk: 100 });
  const pipeline = redis.pipeline();
  for (let i = 0; i < 1000; i += 1) {
    pipeline.set(`${cache.prefix}big:${i}`, "v");
    pipeline.sadd(`${cache.prefix}tag:products:all`, `${cache.prefix}big:${i}`);
  }
  await pipeline.exec();
  await cache.set("kept", "v", ["products:id:9"], 60);
  await cache.set("small", "v", ["products:id:8"], 60);
  const report = await cache.invalidate(["products:all", "products:id:8"]);
  assert.deepEqual(report, { tags: 2, keys: 1001 });
  assert.equal(await redis.exists(`${cache.prefix}big:0`, `${cache.prefix}big:999`, `${cache.prefix}small`), 0);
  assert.equal(await cache.get("kept"), "v");
  assert.ok(Number(await redis.get(`${cache.prefix}tagts:products:all`)) > 0, "marker stamped");
  assert.equal((await redis.keys(`${cache.prefix}drain:*`)).length, 0, "no drain key left");
  assert.equal(await redis.hget(`${cache.prefix}evictd:stats`, "keys"), "1001");
});

test("the service surface clears the tags the daemon's clear types name", async () => {
  const cache = fresh();
  const { cacheInvalidation, CacheInvalidationUtils } = createCacheInvalidation(cache);
  await cache.set("c42", "v", ["products:client:42"], 60);
  await cache.set("c43", "v", ["products:client:43"], 60);
  await cache.set("all", "v", ["products:all"], 60);
  await cache.set("mod", "v", ["module_content:id:7"], 60);
  await cache.set("cfg", "v", ["client_configs:id:42"], 60);
  assert.equal(await cacheInvalidation.invalidateJobReadinessProductsCache("42"), 2);
  assert.equal(await cache.get("c43"), "v");
  assert.equal(await CacheInvalidationUtils.onModuleContentModified("7"), 1);
  assert.equal(await CacheInvalidationUtils.onClientConfigModified("42"), 1);
  // Without an id, the whole table: every products tag, and its marker.
  assert.equal(await cacheInvalidation.invalidateJobReadinessProductsCache(), 1);
  assert.equal(await redis.exists(`${cache.prefix}c43`), 0);
  assert.ok(await redis.exists(`${cache.prefix}tagts-table:public.products`));
  await cache.set("s", "v", ["expert_sessions:product:1"], 60);
  assert.equal(await CacheInvalidationUtils.onBulkDataImport(), 1);
  const stats = await cacheInvalidation.getCacheInvalidationStats();
  assert.equal(stats.totalEntries, 0);
  assert.ok(stats.invalidations.batches >= 4);
  assert.ok(["excellent", "good", "needs_improvement"].includes(stats.recommendations.hit_rate_status));
});

test("tag names the contract cannot carry are refused with a clear message", async () => {
  const cache = fresh();
  for (const tag of ["", "products:all\n", "a\rb", "nul\u0000"]) {
    await assert.rejects(cache.set("k", "v", [tag], 60), (e: unknown) => {
      assert.ok(e instanceof InvalidTagError);
      assert.match(e.message, /^evictd: invalid tag ".*": (empty|contains a control character)/);
      return true;
    });
    await assert.rejects(cache.invalidate([tag]), InvalidTagError);
  }
});

test("with Redis down, reads miss and writes do nothing, with one warning", async () => {
  const port = await freePort();
  const down = new Redis({ port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 0, enableOfflineQueue: false, retryStrategy: () => null });
  const warnings: string[] = [];
  const cache = new EvictdCache(down, { warn: (m) => warnings.push(m) });
  assert.equal(await cache.get("k"), undefined);
  assert.equal(await cache.set("k", "v", ["products:all"], 60), false);
  assert.equal(await cache.cached("k", ["products:all"], async () => "loaded", 60), "loaded");
  assert.equal(warnings.length, 1, warnings.join("\n"));
  assert.match(warnings[0] ?? "", /Redis unavailable/);
  down.disconnect();
});
