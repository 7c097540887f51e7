// An unmodified application caching through @fortedigital/nextjs-cache-handler's Redis handler
// (the real package, from the npm registry) sees database edits once the daemon records the
// tags it invalidates in that handler's revalidated-tags hash (`revalidated_tags_key`).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import createRedisHandler from "@fortedigital/nextjs-cache-handler/redis-strings";
import { createClient } from "redis";

import { EvictdDev, until } from "./support.js";

const C1 = "00000000-0000-0000-0000-0000000000c1";
const C2 = "00000000-0000-0000-0000-0000000000c2";
const PREFIX = "app:";

let dev: EvictdDev;
let client: ReturnType<typeof createClient>;

before(async () => {
  dev = await EvictdDev.start(`revalidated_tags_key = "${PREFIX}__revalidated_tags__"\n`);
  client = createClient({ url: dev.redisUrl });
  await client.connect();
});

after(async () => {
  await client?.quit();
  dev?.stop();
});

// The handler's own types want Next's; the test hands it what Next would.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
const handler = () => createRedisHandler({ client: client as any, keyPrefix: PREFIX });

function page(tags: string[]) {
  return {
    lastModified: Date.now(),
    lifespan: null,
    tags,
    value: { kind: "FETCH", data: { headers: {}, body: "cached", url: "" }, revalidate: 60 },
    // eslint-disable-next-line @typescript-eslint/no-explicit-any
  } as any;
}

test("a database edit makes the handler's entries of its tags stale, and only those", async () => {
  const h = handler();
  await h.set("c1-list", page([`products:client:${C1}`]));
  await h.set("c2-list", page([`products:client:${C2}`]));
  assert.ok(await h.get("c1-list", { implicitTags: [] }), "cached");
  dev.psql(`UPDATE products SET price_cents = price_cents + 1 WHERE client_id = '${C1}'`);
  await until("the c1 list stale", async () => (await h.get("c1-list", { implicitTags: [] })) === null);
  assert.ok(await h.get("c2-list", { implicitTags: [] }), "another client's list stays");
  assert.ok(Number(await client.hGet(`${PREFIX}__revalidated_tags__`, `products:client:${C1}`)) > 0);
});

test("a table-wide invalidation reaches the handler's tags through its tags hash", async () => {
  const h = handler();
  await h.set("c2-again", page([`products:client:${C2}`]));
  await h.set("cfg", page([`client_configs:id:${C2}`]));
  dev.psql("TRUNCATE products CASCADE");
  await until("the c2 list stale", async () => (await h.get("c2-again", { implicitTags: [] })) === null);
  assert.ok(await h.get("cfg", { implicitTags: [] }), "other tables' entries stay");
});
