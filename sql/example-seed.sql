-- A few rows for `evictd dev`, with fixed ids so the printed commands work as written.
INSERT INTO clients (id, name) VALUES
    ('00000000-0000-0000-0000-0000000000c1', 'Acme'),
    ('00000000-0000-0000-0000-0000000000c2', 'Globex')
ON CONFLICT DO NOTHING;
INSERT INTO products (id, client_id, name, price_cents) VALUES
    ('00000000-0000-0000-0000-0000000000a1', '00000000-0000-0000-0000-0000000000c1', 'Interview prep', 4900),
    ('00000000-0000-0000-0000-0000000000a2', '00000000-0000-0000-0000-0000000000c2', 'CV review', 2900)
ON CONFLICT DO NOTHING;
INSERT INTO modules (product_id, title) VALUES
    ('00000000-0000-0000-0000-0000000000a1', 'Introductions');
INSERT INTO job_readiness_expert_sessions (product_id, title) VALUES
    ('00000000-0000-0000-0000-0000000000a1', 'Mock interview');
