-- Per-conversation order (`order: conversation`, src/store/order.rs): a run held behind an
-- earlier run of its workflow and conversation is `waiting` with wait_reason `order`, due
-- only when released. Appends look up unfinished original runs by conversation; a run that
-- ends releases the earliest unfinished one of its workflow and conversation.
CREATE INDEX runs_in_order ON runs (conversation_id, workflow, event_seq)
    WHERE replay_of IS NULL AND status IN ('scheduled', 'running', 'retrying', 'waiting');
