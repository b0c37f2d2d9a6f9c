-- registryd schema: the whole current shape of the registry.
--
-- Applied at start-up inside one transaction that holds an advisory lock
-- (infra/db.py), unless registry_schema says this very text was applied last.
-- It must stay idempotent all the same: IF NOT EXISTS everywhere,
-- and later columns added below the table, each guarded by a look at the
-- catalog so that an instance restarting never locks a table that others use.
-- Every timestamp defaults to the database clock, never the daemon host's.
--
-- Byte counts are bigint: the wire allows 0 ≤ n ≤ 2^63−1, which is exactly
-- PostgreSQL's bigint range, and the checks keep counters from going negative.

CREATE TABLE IF NOT EXISTS nodes (
    id                                  text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    name                                text NOT NULL CONSTRAINT nodes_name_key UNIQUE
                                        CHECK (name <> '' AND length(name) <= 255),
    node_type                           text NOT NULL DEFAULT 'backend'
                                        CONSTRAINT nodes_node_type_check
                                        CHECK (node_type IN ('backend', 'agent')),
    address                             text NOT NULL DEFAULT '' CHECK (length(address) <= 512),
    http_address                        text NOT NULL DEFAULT '' CHECK (length(http_address) <= 512),
    status                              text NOT NULL DEFAULT 'registering'
                                        CONSTRAINT nodes_status_check
                                        CHECK (status IN ('registering', 'pending', 'healthy',
                                                          'unhealthy', 'draining', 'offline')),
    -- SHA-256 (hex) of the registration token the worker presented; never returned.
    token_hash                          text NOT NULL DEFAULT '',
    total_vram                          bigint NOT NULL DEFAULT 0 CHECK (total_vram >= 0),
    available_vram                      bigint NOT NULL DEFAULT 0 CHECK (available_vram >= 0),
    -- Soft, in-tick reservation by schedulers; the next VRAM reading clears it.
    reserved_vram                       bigint NOT NULL DEFAULT 0 CHECK (reserved_vram >= 0),
    total_ram                           bigint NOT NULL DEFAULT 0 CHECK (total_ram >= 0),
    available_ram                       bigint NOT NULL DEFAULT 0 CHECK (available_ram >= 0),
    gpu_vendor                          text NOT NULL DEFAULT '' CHECK (length(gpu_vendor) <= 32),
    max_replicas_per_model              integer NOT NULL DEFAULT 1 CHECK (max_replicas_per_model >= 1),
    -- An admin override of the value above; re-registration leaves it alone.
    max_replicas_per_model_manually_set boolean NOT NULL DEFAULT false,
    -- Auth records LocalAI provisions for agent workers; never returned.
    auth_user_id                        text NOT NULL DEFAULT '',
    api_key_id                          text NOT NULL DEFAULT '',
    last_heartbeat                      timestamptz NOT NULL DEFAULT now(),
    created_at                          timestamptz NOT NULL DEFAULT now(),
    updated_at                          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS nodes_status_idx ON nodes (status, node_type);

-- Approval, stored (v1.1): granted by `approve` or REGISTRY_AUTO_APPROVE, kept
-- until the node is deregistered. Status alone cannot say it: a pending node
-- that went offline and came back looked like an approved one, and a worker
-- could approve itself that way. A database from before this column gets it
-- once, with every node past pending taken as approved (which it was, but for
-- nodes that used that hole).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                    WHERE table_schema = current_schema()
                      AND table_name = 'nodes' AND column_name = 'approved') THEN
        ALTER TABLE nodes ADD COLUMN approved boolean NOT NULL DEFAULT false;
        UPDATE nodes SET approved = true
         WHERE status IN ('healthy', 'unhealthy', 'draining', 'offline');
    END IF;
END $$;

-- A worker's own key (v1.2, node identity): SHA-256 (hex) of the node_key the
-- name was first registered with; '' while none is bound. Never returned.
-- Guarded rather than ADD COLUMN IF NOT EXISTS, which takes the table's
-- exclusive lock even when the column is there: a daemon restarting beside
-- others that serve would then deadlock with their writes.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                    WHERE table_schema = current_schema()
                      AND table_name = 'nodes' AND column_name = 'node_key_hash') THEN
        ALTER TABLE nodes ADD COLUMN node_key_hash text NOT NULL DEFAULT '';
    END IF;
END $$;

-- When the node's status was last set by the state machine (v1.3 fix): the
-- sweep revives an unhealthy or offline node only on a heartbeat newer than
-- this. It was updated_at, which every admin edit (auth_refs, max_replicas,
-- node_key_reset) also moves, so an edit held a node down one more beat.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                    WHERE table_schema = current_schema()
                      AND table_name = 'nodes' AND column_name = 'status_since') THEN
        ALTER TABLE nodes ADD COLUMN status_since timestamptz NOT NULL DEFAULT now();
    END IF;
END $$;

-- The two rules of the node state machine (subjects/node_status.py) that no
-- statement may break, whoever writes it: a node never approved is never
-- healthy, and approval is never taken back (only deregistration ends it).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'nodes_healthy_needs_approval') THEN
        ALTER TABLE nodes ADD CONSTRAINT nodes_healthy_needs_approval
            CHECK (status <> 'healthy' OR approved);
    END IF;
END $$;

CREATE OR REPLACE FUNCTION nodes_keep_approval() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.approved AND NOT NEW.approved THEN
        RAISE EXCEPTION 'node % was approved; only deregistration ends that', OLD.id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'nodes_approval_sticky';
    END IF;
    RETURN NEW;
END $$;

-- Created once: creating a trigger locks the table, and this file runs at
-- every start-up while other instances serve.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'nodes_approval_sticky'
                      AND tgrelid = 'nodes'::regclass) THEN
        CREATE TRIGGER nodes_approval_sticky BEFORE UPDATE OF approved ON nodes
            FOR EACH ROW EXECUTE FUNCTION nodes_keep_approval();
    END IF;
END $$;

-- Half of every page kept free for heartbeats (issue #15). A heartbeat
-- rewrites its node's row; when the new version fits on the same page and no
-- indexed column changed, the update is HOT: no new index entries, and the
-- old version is pruned by the next reader of the page, VACUUM or not. One
-- batch of readings (up to 5,000, infra/heartbeats.py) rewrites every row of
-- a page in one transaction when the nodes registered together heartbeat
-- together, so a page must have room for a second copy of all its rows.
-- Measured over 10,000 nodes and 180,000 heartbeat updates in rounds
-- (`python -m tests.bench table`): the default fillfactor 100 made 2-3% of them
-- HOT, the heap grew 1.9 → 35.3 MB and the sweep's scan read 244 → 4,513
-- buffers; 70 made 92% HOT and the heap grew 2.7 → 6.4 MB; 50 made 100% HOT
-- and the heap stayed 3.9 MB. The emptier pages cost that scan about 5%
-- (2.05 → 2.17 ms): it spends its time on rows, not on pages.
-- It holds only while no column a heartbeat writes (last_heartbeat, the VRAM
-- and RAM readings, gpu_vendor) is indexed: do not index one.
--
-- An existing table is not rewritten for it (that would lock it): the next
-- update of each row on a full page moves it, once, to a page filled to half,
-- and from the second heartbeat on every one is HOT. The pages it left stay
-- in the file, for VACUUM to hand to later rows. The setting takes only a
-- SHARE UPDATE EXCLUSIVE lock, which no read or write waits for; it is still
-- set only when the catalog says it is not.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_class
                    WHERE oid = 'nodes'::regclass AND 'fillfactor=50' = ANY (reloptions)) THEN
        ALTER TABLE nodes SET (fillfactor = 50);
    END IF;
END $$;

-- One row per model replica on a node (Go: NodeModel).
CREATE TABLE IF NOT EXISTS replicas (
    id              text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    node_id         text NOT NULL
                    CONSTRAINT replicas_node_id_fkey REFERENCES nodes (id) ON DELETE CASCADE,
    model_name      text NOT NULL CHECK (model_name <> '' AND length(model_name) <= 255),
    replica_index   integer NOT NULL DEFAULT 0 CHECK (replica_index >= 0),
    address         text NOT NULL DEFAULT '' CHECK (length(address) <= 512),
    state           text NOT NULL DEFAULT 'idle'
                    CONSTRAINT replicas_state_check
                    CHECK (state IN ('loading', 'loaded', 'unloading', 'idle')),
    in_flight       integer NOT NULL DEFAULT 0 CONSTRAINT replicas_in_flight_check CHECK (in_flight >= 0),
    last_used       timestamptz NOT NULL DEFAULT now(),
    loading_by      text NOT NULL DEFAULT '' CHECK (length(loading_by) <= 255),
    backend_type    text NOT NULL DEFAULT '' CHECK (length(backend_type) <= 128),
    model_opts      bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT replicas_node_model_index_key UNIQUE (node_id, model_name, replica_index)
);

-- The pick path reads loaded replicas of one model; the unique key above
-- serves every lookup by node.
CREATE INDEX IF NOT EXISTS replicas_model_state_idx ON replicas (model_name, state);

CREATE TABLE IF NOT EXISTS node_labels (
    node_id text NOT NULL
            CONSTRAINT node_labels_node_id_fkey REFERENCES nodes (id) ON DELETE CASCADE,
    key     text NOT NULL CHECK (key <> '' AND length(key) <= 128),
    value   text NOT NULL CHECK (length(value) <= 255),
    CONSTRAINT node_labels_pkey PRIMARY KEY (node_id, key)
);

CREATE INDEX IF NOT EXISTS node_labels_key_value_idx ON node_labels (key, value);

-- Per-model scheduling and autoscaling (Go: ModelSchedulingConfig).
CREATE TABLE IF NOT EXISTS scheduling_configs (
    id                      text PRIMARY KEY DEFAULT gen_random_uuid()::text,
    model_name              text NOT NULL CONSTRAINT scheduling_configs_model_name_key UNIQUE
                            CHECK (model_name <> '' AND length(model_name) <= 255),
    -- The selector as JSON text, {"key": "value", …}; '' when there is none.
    node_selector           text NOT NULL DEFAULT '',
    min_replicas            integer NOT NULL DEFAULT 0 CHECK (min_replicas >= 0),
    max_replicas            integer NOT NULL DEFAULT 0 CHECK (max_replicas >= 0),
    route_policy            text NOT NULL DEFAULT '' CHECK (length(route_policy) <= 32),
    balance_abs_threshold   integer NOT NULL DEFAULT 0 CHECK (balance_abs_threshold >= 0),
    balance_rel_threshold   double precision NOT NULL DEFAULT 0 CHECK (balance_rel_threshold >= 0),
    min_prefix_match        double precision NOT NULL DEFAULT 0 CHECK (min_prefix_match >= 0),
    unsatisfiable_until     timestamptz,
    unsatisfiable_ticks     integer NOT NULL DEFAULT 0 CHECK (unsatisfiable_ticks >= 0),
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

-- Load metadata per model, kept apart from replica rows so it survives them
-- (Go: ModelLoadInfo).
CREATE TABLE IF NOT EXISTS model_load_info (
    model_name      text PRIMARY KEY CHECK (model_name <> '' AND length(model_name) <= 255),
    backend_type    text NOT NULL DEFAULT '' CHECK (length(backend_type) <= 128),
    model_opts      bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Leases on in-flight units (an addition to LocalAI's registry): a findlock
-- with `lease_s` records one row here, and the unit is given back by
-- inflight_dec with its id or, when it expires, by the daemon's sweep. The
-- row dies with its replica, so a removed replica leaves nothing to release.
CREATE TABLE IF NOT EXISTS leases (
    id              text PRIMARY KEY CHECK (id <> '' AND length(id) <= 64),
    replica_id      text NOT NULL
                    CONSTRAINT leases_replica_id_fkey REFERENCES replicas (id) ON DELETE CASCADE,
    node_id         text NOT NULL,
    model_name      text NOT NULL,
    replica_index   integer NOT NULL,
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The expiry sweep reads by expiry time; the cascade from replicas by replica.
CREATE INDEX IF NOT EXISTS leases_expires_at_idx ON leases (expires_at);
CREATE INDEX IF NOT EXISTS leases_replica_id_idx ON leases (replica_id);

-- The digest (SHA-256) of the text of this file as last applied: a start-up
-- that finds its own digest here applies nothing (infra/db.py).
CREATE TABLE IF NOT EXISTS registry_schema (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    digest      text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
