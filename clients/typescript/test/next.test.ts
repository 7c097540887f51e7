// The Next.js `cacheHandlers` handler against a real Redis and the real daemon: entries shared
// through Redis, made stale by evictd's invalidation of their `cacheTag` tags, revalidated by
// Next's `updateTags` through the same path, and a miss — never an error — when Redis is down.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Redis } from "ioredis";

import { createCacheHandler, type CacheEntry } from "../src/index.js";
import { EvictdDev, freePort, until } from "./support.js";

const C1 = "00000000-0000-0000-0000-0000000000c1";

let dev: EvictdDev;
let redis: Redis;

before(async () => {
  dev = await EvictdDev.start();
  redis = new Redis(dev.redisUrl);
});

after(() => {
  redis?.disconnect();
  dev?.stop();
});

function entry(text: string, tags: string[]): CacheEntry {
  return {
    value: new ReadableStream({
      start(controller) {
        controller.enqueue(new TextEncoder().encode(text));
        controller.close();
      },
    }),
    tags,
    stale: 0,
    timestamp: Date.now(),
    expire: 3600,
    revalidate: 900,
  };
}

async function text(found: CacheEntry | undefined): Promise<string | undefined> {
  return found ? new Response(found.value).text() : undefined;
}

test("an entry is shared through Redis and goes stale when evictd invalidates its tag", async () => {
  const one = createCacheHandler({ redis });
  const otherRedis = new Redis(dev.redisUrl);
  const other = createCacheHandler({ redis: otherRedis });
  await one.set("products-page", Promise.resolve(entry("<ul>products</ul>", [`products:client:${C1}`])));
  assert.equal(await text(await other.get("products-page", [])), "<ul>products</ul>", "another instance sees it");
  const before = await other.getExpiration([`products:client:${C1}`]);
  dev.psql(`UPDATE products SET price_cents = price_cents + 1 WHERE client_id = '${C1}'`);
  await until("the page's entry gone", async () => (await other.get("products-page", [])) === undefined);
  assert.ok((await other.getExpiration([`products:client:${C1}`])) > before, "the tag's expiration moved");
  otherRedis.disconnect();
});

test("updateTags (revalidateTag) invalidates through the daemon's path", async () => {
  const handler = createCacheHandler({ redis });
  await handler.set("a", Promise.resolve(entry("a", ["next:tag"])));
  await handler.set("b", Promise.resolve(entry("b", ["next:other"])));
  await handler.updateTags(["next:tag"]);
  assert.equal(await handler.get("a", []), undefined);
  assert.equal(await text(await handler.get("b", [])), "b");
  assert.ok(Number(await redis.get("cache:tagts:next:tag")) > 0);
});

test("a soft tag invalidated after the entry was made hides it", async () => {
  const handler = createCacheHandler({ redis });
  await handler.set("page", Promise.resolve(entry("p", ["page:tag"])));
  await handler.updateTags(["_N_T_/products"]);
  assert.equal(await handler.get("page", ["_N_T_/products"]), undefined);
  assert.equal(await text(await handler.get("page", ["_N_T_/elsewhere"])), "p");
});

test("a get while the entry is still being written waits for it", async () => {
  const handler = createCacheHandler({ redis });
  let finish: (e: CacheEntry) => void = () => {};
  const writing = handler.set("slow", new Promise<CacheEntry>((resolve) => (finish = resolve)));
  const read = handler.get("slow", []);
  finish(entry("done", ["slow:tag"]));
  await writing;
  assert.equal(await text(await read), "done");
});

test("with Redis down every call is a miss or a no-op, never an exception", async () => {
  const port = await freePort();
  const down = new Redis({ port, lazyConnect: true, maxRetriesPerRequest: 0, enableOfflineQueue: false, retryStrategy: () => null });
  const warnings: string[] = [];
  const handler = createCacheHandler({ redis: down, warn: (m) => warnings.push(m) });
  await handler.set("k", Promise.resolve(entry("v", ["t"])));
  assert.equal(await handler.get("k", ["soft"]), undefined);
  assert.equal(await handler.getExpiration(["t"]), 0);
  await handler.updateTags(["t"]);
  await handler.refreshTags();
  assert.ok(warnings.length >= 1);
  down.disconnect();
});
