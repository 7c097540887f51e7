// Real servers for the package's tests: a throwaway `redis-server`, and `evictd dev` (the
// daemon with its own throwaway PostgreSQL and Redis) built by `cargo build`.

import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { Redis } from "ioredis";

export const DEADLINE_MS = 30_000;

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => resolve(typeof address === "object" && address ? address.port : 0));
    });
  });
}

/** Waits until `check()` holds, at most DEADLINE_MS. */
export async function until(what: string, check: () => Promise<boolean> | boolean): Promise<void> {
  const start = Date.now();
  while (!(await check())) {
    if (Date.now() - start > DEADLINE_MS) throw new Error(`${what}: not within ${DEADLINE_MS} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A redis-server of the test's own, on a free port, in a temporary directory. */
export class RedisServer {
  private constructor(
    readonly port: number,
    private readonly child: ChildProcess,
    private readonly dir: string,
  ) {}

  static async start(): Promise<RedisServer> {
    const port = await freePort();
    const dir = mkdtempSync(join(tmpdir(), "evictd-ts-redis-"));
    const child = spawn(
      "redis-server",
      ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    const failed = new Promise<never>((_, reject) => {
      child.once("error", (e) =>
        reject(new Error(`cannot start redis-server (apt-get install redis-server): ${e.message}`)),
      );
    });
    let log = "";
    child.stdout?.on("data", (d: Buffer) => (log += d.toString()));
    await Promise.race([failed, until("redis-server ready", () => log.includes("Ready to accept connections"))]);
    return new RedisServer(port, child, dir);
  }

  client(): Redis {
    return new Redis({ port: this.port, host: "127.0.0.1", lazyConnect: false });
  }

  stop(): void {
    this.child.kill("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** This process' environment without evictd's settings: the servers the test starts decide. */
function cleanEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(
    Object.entries(process.env).filter(
      ([name]) => !name.startsWith("EVICTD_") && name !== "DATABASE_URL" && name !== "REDIS_URL",
    ),
  );
}

/** `evictd dev`: PostgreSQL with the example schema and evictd installed, Redis, the daemon. */
export class EvictdDev {
  private constructor(
    private readonly child: ChildProcess,
    readonly databaseUrl: string,
    readonly redisUrl: string,
    private readonly logText: () => string,
  ) {}

  static binary(): string {
    return (
      process.env.EVICTD_BIN ??
      fileURLToPath(new URL("../../../../target/debug/evictd", import.meta.url))
    );
  }

  /** Starts `evictd dev`, with `config` (TOML) as its configuration file when given. */
  static async start(config?: string): Promise<EvictdDev> {
    const env: NodeJS.ProcessEnv = { ...cleanEnv(), EVICTD_LOG: "info" };
    if (config !== undefined) {
      const dir = mkdtempSync(join(tmpdir(), "evictd-ts-config-"));
      env.EVICTD_CONFIG = join(dir, "evictd.toml");
      writeFileSync(env.EVICTD_CONFIG, config);
    }
    const child = spawn(EvictdDev.binary(), ["dev", "--http-addr", "127.0.0.1:0"], {
      stdio: ["ignore", "ignore", "pipe"],
      env,
    });
    let log = "";
    child.stderr?.on("data", (d: Buffer) => (log += d.toString()));
    const failed = new Promise<never>((_, reject) => {
      child.once("error", (e) => reject(new Error(`cannot run ${EvictdDev.binary()} (cargo build first): ${e.message}`)));
      child.once("exit", (code) => reject(new Error(`evictd dev exited (${code}):\n${log}`)));
    });
    await Promise.race([failed, until("evictd dev ready", () => log.includes("evictd is ready"))]);
    failed.catch(() => {});
    const databaseUrl = /PostgreSQL at (\S+)/.exec(log)?.[1];
    const redisUrl = /Redis at (\S+)/.exec(log)?.[1];
    if (!databaseUrl || !redisUrl) throw new Error(`evictd dev did not say its URLs:\n${log}`);
    return new EvictdDev(child, databaseUrl, redisUrl, () => log);
  }

  log(): string {
    return this.logText();
  }

  /** Runs SQL with psql against the dev database, as a DBA would. */
  psql(sql: string): string {
    const out = spawnSync("psql", [this.databaseUrl, "-v", "ON_ERROR_STOP=1", "-Atc", sql], { encoding: "utf8" });
    if (out.error) throw new Error(`psql (apt-get install postgresql-client): ${out.error.message}`);
    if (out.status !== 0) throw new Error(`psql ${sql}: ${out.stderr}`);
    return out.stdout;
  }

  /** Runs the evictd CLI against the dev servers. */
  cli(args: string[]): string {
    const out = spawnSync(EvictdDev.binary(), args, {
      encoding: "utf8",
      env: { ...cleanEnv(), DATABASE_URL: this.databaseUrl, REDIS_URL: this.redisUrl },
    });
    if (out.status !== 0) throw new Error(`evictd ${args.join(" ")}: ${out.stderr}`);
    return out.stdout;
  }

  stop(): void {
    this.child.kill("SIGTERM");
  }
}
