import { fileURLToPath } from "node:url";

/** @type {import('next').NextConfig} */
const nextConfig = {
  // "use cache" and cacheTag(); their entries go through evictd's handler into Redis.
  cacheComponents: true,
  cacheHandlers: {
    default: fileURLToPath(new URL("./cache-handler.mjs", import.meta.url)),
  },
  // Loaded by Node at run time rather than bundled: the package reads its Lua and rules from
  // its own directory (and in this repository it is a link outside the app).
  serverExternalPackages: ["@evictd/cache", "ioredis", "pg"],
  turbopack: { root: fileURLToPath(new URL("../..", import.meta.url)) },
};

export default nextConfig;
