// The listener a team would write in an afternoon, for evictd's benchmark to measure itself
// against (peer.sql is its database half): LISTEN, and for each notification compute the
// row's tags (the same as evictd's default rules) and, one tag at a time, await SMEMBERS of
// the tag's set, DEL its entries, DEL the set. Same Redis layout as evictd's.
//
//     DATABASE_URL=… REDIS_URL=… node listener.mjs      # prints "peer is ready" on stderr
import pg from 'pg';
import Redis from 'ioredis';

const prefix = process.env.KEY_PREFIX ?? 'cache:';
const tagsOf = {
  products: (row) => ['products:all', `products:client:${row.client_id}`, `products:id:${row.id}`],
  job_readiness_expert_sessions: (row) => [
    'expert_sessions:all',
    `expert_sessions:product:${row.product_id}`,
    `expert_sessions:id:${row.id}`,
  ],
  modules: (row) => [`module_content:id:${row.id}`, `module_content:product:${row.product_id}`],
  clients: (row) => ['client_configs:all', `client_configs:id:${row.id}`],
};

const redis = new Redis(process.env.REDIS_URL);
const db = new pg.Client({ connectionString: process.env.DATABASE_URL });

db.on('notification', async ({ payload }) => {
  const row = JSON.parse(payload);
  for (const tag of tagsOf[row.table](row)) {
    const set = `${prefix}tag:${tag}`;
    const keys = await redis.smembers(set);
    if (keys.length > 0) await redis.del(...keys);
    await redis.del(set);
  }
});
db.on('error', (error) => {
  console.error(error);
  process.exit(1);
});

await db.connect();
await db.query('LISTEN cache_invalidation_peer');
console.error('peer is ready');
