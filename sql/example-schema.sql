-- The application's schema, reduced to what evictd's default rules reference: uuid primary keys
-- and foreign keys between clients, products, modules and expert sessions, as in Supabase.
-- Used by `evictd dev` and by the tests.

CREATE TABLE IF NOT EXISTS clients (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL,
    config jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE IF NOT EXISTS products (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_id uuid REFERENCES clients (id) ON DELETE SET NULL,
    name text NOT NULL,
    price_cents bigint NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS modules (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    product_id uuid REFERENCES products (id) ON DELETE CASCADE,
    title text NOT NULL,
    content text NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS job_readiness_expert_sessions (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    product_id uuid REFERENCES products (id) ON DELETE CASCADE,
    title text NOT NULL,
    video_url text
);
