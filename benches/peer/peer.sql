-- The database half of the listener a team would write in an afternoon: a row trigger per
-- table that NOTIFYs each changed row's id and foreign keys (the new row's, or the deleted
-- one's). evictd's benchmark installs it in the peer's database and runs listener.mjs on it.
CREATE FUNCTION peer_products() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('cache_invalidation_peer', json_build_object(
            'table', 'products', 'id', OLD.id, 'client_id', OLD.client_id)::text);
    ELSE
        PERFORM pg_notify('cache_invalidation_peer', json_build_object(
            'table', 'products', 'id', NEW.id, 'client_id', NEW.client_id)::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER peer_products AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH ROW EXECUTE FUNCTION peer_products();

CREATE FUNCTION peer_expert_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('cache_invalidation_peer', json_build_object(
            'table', 'job_readiness_expert_sessions', 'id', OLD.id, 'product_id', OLD.product_id)::text);
    ELSE
        PERFORM pg_notify('cache_invalidation_peer', json_build_object(
            'table', 'job_readiness_expert_sessions', 'id', NEW.id, 'product_id', NEW.product_id)::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER peer_expert_sessions AFTER INSERT OR UPDATE OR DELETE ON job_readiness_expert_sessions
    FOR EACH ROW EXECUTE FUNCTION peer_expert_sessions();

CREATE FUNCTION peer_modules() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('cache_invalidation_peer', json_build_object(
            'table', 'modules', 'id', OLD.id, 'product_id', OLD.product_id)::text);
    ELSE
        PERFORM pg_notify('cache_invalidation_peer', json_build_object(
            'table', 'modules', 'id', NEW.id, 'product_id', NEW.product_id)::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER peer_modules AFTER INSERT OR UPDATE OR DELETE ON modules
    FOR EACH ROW EXECUTE FUNCTION peer_modules();

CREATE FUNCTION peer_clients() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('cache_invalidation_peer', json_build_object('table', 'clients', 'id', OLD.id)::text);
    ELSE
        PERFORM pg_notify('cache_invalidation_peer', json_build_object('table', 'clients', 'id', NEW.id)::text);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER peer_clients AFTER INSERT OR UPDATE OR DELETE ON clients
    FOR EACH ROW EXECUTE FUNCTION peer_clients();
