// End to end: PostgreSQL, Redis and evictd (`evictd dev`), and this application's production
// build under `next start`. Pages are requested over HTTP, rows are edited with psql, and every
// page must be fresh within a second of COMMIT while nothing no change touched is rebuilt (the
// app counts its loaders' runs). Also the race: a loader that reads, then dawdles across an
// edit, must not leave its stale value cached.

import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createServer } from "node:net";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";

const APP = fileURLToPath(new URL("..", import.meta.url));
const EVICTD = process.env.EVICTD_BIN ?? fileURLToPath(new URL("../../../target/debug/evictd", import.meta.url));
const C1 = "00000000-0000-0000-0000-0000000000c1";
const C2 = "00000000-0000-0000-0000-0000000000c2";
const C3 = "00000000-0000-0000-0000-0000000000c3";
const A1 = "00000000-0000-0000-0000-0000000000a1";
const A2 = "00000000-0000-0000-0000-0000000000a2";
const FRESH_WITHIN_MS = 1_000;

const children = [];
let databaseUrl;
let redisUrl;
let base;

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

async function until(what, check, deadlineMs = 60_000) {
  const start = Date.now();
  for (;;) {
    if (await check()) return Date.now() - start;
    if (Date.now() - start > deadlineMs) throw new Error(`${what}: not within ${deadlineMs} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Starts `command`, keeps its output, and waits for `ready` in it. */
async function startProcess(command, args, options, ready) {
  // A process group of its own, so that stopping it stops what it started (npx → next-server).
  const child = spawn(command, args, { ...options, stdio: ["ignore", "pipe", "pipe"], detached: true });
  children.push(child);
  let log = "";
  child.stdout.on("data", (d) => (log += d));
  child.stderr.on("data", (d) => (log += d));
  let exited = false;
  child.once("exit", () => (exited = true));
  child.once("error", (e) => {
    exited = true;
    log += `\n${e.message}`;
  });
  await until(`${command} ready`, () => {
    if (exited) throw new Error(`${command} ${args.join(" ")} exited:\n${log}`);
    return ready.test(log);
  });
  return () => log;
}

function psql(sql) {
  const out = spawnSync("psql", [databaseUrl, "-v", "ON_ERROR_STOP=1", "-Atc", sql], { encoding: "utf8" });
  if (out.error) throw new Error(`psql (apt-get install postgresql-client): ${out.error.message}`);
  if (out.status !== 0) throw new Error(`psql ${sql}: ${out.stderr}`);
  return out.stdout;
}

function redisCli(args) {
  const out = spawnSync("redis-cli", ["-u", redisUrl, ...args], { encoding: "utf8" });
  if (out.error) throw new Error(`redis-cli (apt-get install redis-tools): ${out.error.message}`);
  return out.stdout.trim();
}

async function page(path) {
  const response = await fetch(base + path);
  assert.equal(response.status, 200, `${path}: ${response.status}`);
  return response.text();
}

async function json(path) {
  return JSON.parse(await page(path));
}

const loads = () => json("/api/loads");

/** Commits `sql` and returns how long after COMMIT `fresh()` held. */
async function freshAfter(sql, fresh) {
  psql(sql);
  return until(`fresh after ${sql}`, fresh, FRESH_WITHIN_MS);
}

before(async () => {
  const clean = Object.fromEntries(
    Object.entries(process.env).filter(([k]) => !k.startsWith("EVICTD_") && k !== "DATABASE_URL" && k !== "REDIS_URL"),
  );
  const devLog = await startProcess(EVICTD, ["dev", "--http-addr", "127.0.0.1:0"], { env: { ...clean, EVICTD_LOG: "info" } }, /evictd is ready/);
  databaseUrl = /PostgreSQL at (\S+)/.exec(devLog())[1];
  redisUrl = /Redis at (\S+)/.exec(devLog())[1];
  psql(`INSERT INTO clients (id, name) VALUES ('${C3}', 'Initech');
        INSERT INTO products (client_id, name) SELECT '${C3}', 'bulk ' || i FROM generate_series(1, 10000) i;`);
  const port = await freePort();
  base = `http://127.0.0.1:${port}`;
  await startProcess(
    fileURLToPath(new URL("../node_modules/.bin/next", import.meta.url)),
    ["start", "-p", String(port), "-H", "127.0.0.1"],
    { cwd: APP, env: { ...clean, DATABASE_URL: databaseUrl, REDIS_URL: redisUrl, NODE_ENV: "production" } },
    /Ready in|started server/i,
  );
});

after(() => {
  for (const child of children.reverse()) {
    try {
      process.kill(-child.pid, "SIGTERM");
    } catch {
      // Already gone.
    }
    child.stdout.destroy();
    child.stderr.destroy();
  }
});

test("pages are cached: a second request runs no loader", async () => {
  assert.match(await page(`/products/${A1}`), /Interview prep/);
  assert.match(await page(`/products/${A1}`), /Introductions/);
  assert.equal((await json(`/api/clients/${C1}/products`)).count, 1);
  assert.equal((await json(`/api/clients/${C2}/products`)).count, 1);
  assert.equal((await json(`/api/clients/${C3}/products`)).count, 10_000);
  const first = await loads();
  await page(`/products/${A1}`);
  await json(`/api/clients/${C1}/products`);
  await json(`/api/clients/${C3}/products`);
  assert.deepEqual(await loads(), first);
});

test("edits of every kind make exactly the pages they touch fresh within a second", async () => {
  // Warm everything, then note the loaders' counts.
  await page(`/products/${A1}`);
  await page(`/products/${A2}`);
  for (const c of [C1, C2, C3]) await json(`/api/clients/${c}/products`);
  let before = await loads();
  const since = (what) => async () => (await loads())[what] - (before[what] ?? 0);

  // One UPDATE: the product's page and its client's list, nothing else.
  await freshAfter(`UPDATE products SET name = 'Interview prep II' WHERE id = '${A1}'`, async () =>
    (await page(`/products/${A1}`)).includes("Interview prep II"),
  );
  await until("c1 list fresh", async () => (await json(`/api/clients/${C1}/products`)).products[0].name === "Interview prep II", FRESH_WITHIN_MS);
  await page(`/products/${A2}`);
  await json(`/api/clients/${C2}/products`);
  await json(`/api/clients/${C3}/products`);
  assert.equal(await since(`product:${A2}`)(), 0, "another product's page was rebuilt");
  assert.equal(await since(`products:${C2}`)(), 0, "another client's list was rebuilt");
  assert.equal(await since(`products:${C3}`)(), 0, "another client's list was rebuilt");

  // A 10,000-row UPDATE.
  before = await loads();
  await freshAfter(`UPDATE products SET name = 'renamed ' || name WHERE client_id = '${C3}'`, async () =>
    (await json(`/api/clients/${C3}/products`)).products.every((p) => p.name.startsWith("renamed ")),
  );
  await page(`/products/${A2}`);
  assert.equal(await since(`product:${A2}`)(), 0);

  // A DELETE of a module: its product's page.
  await freshAfter(`DELETE FROM modules WHERE product_id = '${A1}'`, async () => !(await page(`/products/${A1}`)).includes("Introductions"));

  // A TRUNCATE of modules: every product page (table-wide), no client list.
  psql(`INSERT INTO modules (product_id, title) VALUES ('${A2}', 'Portfolio')`);
  await until("a2 shows its module", async () => (await page(`/products/${A2}`)).includes("Portfolio"), FRESH_WITHIN_MS);
  before = await loads();
  await freshAfter("TRUNCATE modules", async () => !(await page(`/products/${A2}`)).includes("Portfolio"));
  await json(`/api/clients/${C1}/products`);
  assert.equal(await since(`products:${C1}`)(), 0, "a client list was rebuilt by a modules TRUNCATE");

  // evictd.invalidate_tags: on ROLLBACK nothing, on COMMIT the page.
  before = await loads();
  psql(`BEGIN; SELECT evictd.invalidate_tags('products:client:${C2}'); ROLLBACK;`);
  // A barrier: once the daemon has stamped a later commit's tag, it has handled the rollback's.
  psql(`SELECT evictd.invalidate_tags('barrier:e2e')`);
  await until("the barrier handled", () => redisCli(["EXISTS", "cache:tagts:barrier:e2e"]) === "1");
  await json(`/api/clients/${C2}/products`);
  assert.equal(await since(`products:${C2}`)(), 0, "rebuilt after a ROLLBACK");
  await freshAfter(`BEGIN; SELECT evictd.invalidate_tags('products:client:${C2}'); COMMIT;`, async () => {
    await json(`/api/clients/${C2}/products`);
    return (await since(`products:${C2}`)()) === 1;
  });
});

test("a loader that reads before an edit and finishes after it leaves nothing stale", async () => {
  psql(`SELECT evictd.invalidate_tags('products:client:${C2}')`);
  await until("c2 list gone", () => redisCli(["EXISTS", `cache:products:list:${C2}`]) === "0");
  const before = (await loads())[`products:${C2}`];
  const slow = json(`/api/clients/${C2}/products?sleep=1500`);
  await new Promise((r) => setTimeout(r, 300));
  psql(`UPDATE products SET name = 'CV review II' WHERE id = '${A2}'`);
  const old = await slow;
  assert.equal(old.products[0].name, "CV review", "the slow request read before the edit");
  assert.equal((await loads())[`products:${C2}`], before + 1, "the slow request ran its loader");
  await until(
    "the next request reads the edit",
    async () => (await json(`/api/clients/${C2}/products`)).products[0].name === "CV review II",
    FRESH_WITHIN_MS,
  );
});

test("with Redis gone, pages are still served, from the database", async () => {
  redisCli(["SHUTDOWN", "NOSAVE"]);
  psql(`UPDATE products SET name = 'Interview prep III' WHERE id = '${A1}'`);
  assert.match(await page(`/products/${A1}`), /Interview prep III/);
  assert.equal((await json(`/api/clients/${C1}/products`)).products[0].name, "Interview prep III");
});
