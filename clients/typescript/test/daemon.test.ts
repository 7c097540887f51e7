// The package beside the real daemon (`evictd dev`: PostgreSQL with the example schema, Redis,
// evictd): what the package caches, database edits remove; a slow read across an edit leaves
// nothing stale; its statistics are the daemon's.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Redis } from "ioredis";

import { EvictdCache } from "../src/index.js";
import { EvictdDev, until } from "./support.js";

const C1 = "00000000-0000-0000-0000-0000000000c1";
const C2 = "00000000-0000-0000-0000-0000000000c2";
const A1 = "00000000-0000-0000-0000-0000000000a1";

let dev: EvictdDev;
let redis: Redis;
let cache: EvictdCache;
let barriers = 0;

before(async () => {
  dev = await EvictdDev.start();
  redis = new Redis(dev.redisUrl);
  cache = new EvictdCache(redis);
});

after(() => {
  redis?.disconnect();
  dev?.stop();
});

/** Returns once the daemon has handled every change committed before the call. */
async function barrier(): Promise<void> {
  barriers += 1;
  const tag = `barrier:${barriers}`;
  await cache.set(`barrier:${barriers}`, 1, [tag], 60);
  dev.psql(`SELECT evictd.invalidate_tags('${tag}')`);
  await until("the barrier's entry gone", async () => (await redis.exists(`cache:barrier:${barriers}`)) === 0);
}

test("a database edit removes what the package cached, and only that", async () => {
  await cache.cached(`products:list:${C1}`, ["products:all", `products:client:${C1}`], async () => ["p"], 60);
  await cache.cached(`client:${C2}`, [`client_configs:id:${C2}`], async () => "c2", 60);
  dev.psql(`UPDATE products SET price_cents = price_cents + 1 WHERE client_id = '${C1}'`);
  await until("the list of c1 gone", async () => (await redis.exists(`cache:products:list:${C1}`)) === 0);
  await barrier();
  assert.equal(await cache.get(`client:${C2}`), "c2");
});

test("a loader that reads across an edit leaves nothing stale behind", async () => {
  const key = `product:${A1}`;
  const value = await cache.cached(
    key,
    [`products:id:${A1}`],
    async () => {
      const old = dev.psql(`SELECT name FROM products WHERE id = '${A1}'`).trim();
      // The edit commits, and the daemon invalidates it, while this read is still "in flight".
      dev.psql(`UPDATE products SET name = name || '!' WHERE id = '${A1}'`);
      await until("the daemon's marker", async () => (await redis.exists(`cache:tagts:products:id:${A1}`)) === 1);
      return old;
    },
    60,
  );
  assert.ok(value.length > 0);
  await barrier();
  assert.equal(await redis.exists(`cache:${key}`), 0, "the value read before the edit was cached");
  const fresh = await cache.cached(key, [`products:id:${A1}`], async () => dev.psql(`SELECT name FROM products WHERE id = '${A1}'`).trim(), 60);
  assert.ok(fresh.endsWith("!"));
  assert.equal(await cache.get(key), fresh);
});

test("evictd.invalidate_tags in a transaction: nothing on ROLLBACK, removed on COMMIT", async () => {
  await cache.set("manual", "v", ["manual:tag"], 60);
  dev.psql("BEGIN; SELECT evictd.invalidate_tags('manual:tag'); ROLLBACK;");
  await barrier();
  assert.equal(await cache.get("manual"), "v");
  dev.psql("BEGIN; SELECT evictd.invalidate_tags('manual:tag'); COMMIT;");
  await until("the entry gone", async () => (await redis.exists("cache:manual")) === 0);
});

test("the package's statistics are evictd stats' (same fields, same counts)", async () => {
  await cache.set("stats:1", 1, ["stats:a", "stats:b"], 60);
  await redis.sadd("cache:tag:stats:a", "cache:stats:gone");
  const ours = (await cache.stats()) as unknown as Record<string, unknown>;
  const daemons = JSON.parse(dev.cli(["stats"])) as Record<string, unknown>;
  delete daemons.outbox;
  assert.deepEqual(Object.keys(ours).sort(), Object.keys(daemons).sort());
  for (const field of ["totalEntries", "expiredEntries", "tagSets", "tagMembers", "invalidations", "recommendations"]) {
    assert.deepEqual(ours[field], daemons[field], field);
  }
});
