-- Workflow versions: every loaded definition, content-addressed; a run executes the version it matched.
CREATE TABLE workflow_versions (
    hash        TEXT PRIMARY KEY,          -- sha256 of the workflow name and its normalised YAML (see README "How runs execute")
    workflow    TEXT NOT NULL,
    file        TEXT NOT NULL,             -- the file it was first loaded from
    definition  TEXT NOT NULL,             -- the YAML as first loaded
    created_at  TEXT NOT NULL        -- first loaded at
);
CREATE INDEX workflow_versions_by_name ON workflow_versions (workflow, created_at);
ALTER TABLE runs ADD COLUMN version TEXT;  -- the hash of the version the run matched (NULL: runs created before versions)
