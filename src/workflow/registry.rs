//! The live set of workflows, swappable at runtime (reload), and the
//! [`Dispatcher`] the store calls to decide which runs a new event starts.

use std::sync::{Arc, RwLock};

use super::WorkflowSet;
use super::matching::{EventFacts, base_context, decide};
use crate::store::projection::ConversationState;
use crate::store::{DispatchDecision, Dispatcher, NewEvent, PreparedAnswer};

#[derive(Default)]
pub struct Registry {
    set: RwLock<Arc<WorkflowSet>>,
    /// Destinations (issue 14): the gate every outbound request passes, configured with the set.
    pub gate: crate::destinations::gate::Gate,
}

impl Registry {
    pub fn new(set: WorkflowSet) -> Self {
        Self::with_gate(set, crate::destinations::gate::Gate::default())
    }

    /// With a gate of its own (shared across instances on PostgreSQL).
    pub fn with_gate(set: WorkflowSet, gate: crate::destinations::gate::Gate) -> Self {
        gate.configure(set.destinations.clone());
        Self {
            set: RwLock::new(Arc::new(set)),
            gate,
        }
    }

    /// The set in force now.
    pub fn current(&self) -> Arc<WorkflowSet> {
        self.set.read().expect("registry lock").clone()
    }

    /// Puts a new set in force (runs already created keep running by workflow name).
    pub fn replace(&self, set: WorkflowSet) {
        self.gate.configure(set.destinations.clone());
        *self.set.write().expect("registry lock") = Arc::new(set);
    }
}

/// Stores every workflow of `set` as a version (content-addressed: a
/// definition stored before is not stored again). Call before the set is put
/// in force, so every run it creates finds its version in the database.
pub async fn record_versions(
    store: &dyn crate::store::EventStore,
    set: &WorkflowSet,
) -> Result<(), crate::store::StoreError> {
    let now = chrono::Utc::now();
    let versions: Vec<_> = set
        .workflows
        .iter()
        .map(|w| crate::store::runs::WorkflowVersion {
            hash: w.version.clone(),
            workflow: w.name.clone(),
            file: w.file.display().to_string(),
            definition: w.source.clone(),
            created_at: now,
        })
        .collect();
    store.save_workflow_versions(&versions).await
}

impl Dispatcher for Registry {
    fn fan_out(&self) -> usize {
        self.current().workflows.len()
    }

    /// Records a verdict for every workflow on this event's type; setup
    /// workflows that answer (`respond`) are not runs and are left out.
    fn dispatch(
        &self,
        event: &NewEvent,
        before: Option<&ConversationState>,
        after: Option<&ConversationState>,
    ) -> Vec<DispatchDecision> {
        let set = self.current();
        let candidates: Vec<_> = set
            .workflows
            .iter()
            .filter(|w| {
                w.event == event.envelope.event_type && w.respond.is_none() && w.fallback.is_none()
            })
            .collect();
        if candidates.is_empty() {
            return Vec::new();
        }
        let event_json: serde_json::Value =
            serde_json::from_slice(&event.raw_body).unwrap_or_default();
        let facts = EventFacts {
            envelope: &event.envelope,
            event_json: &event_json,
            before,
            after,
        };
        candidates
            .into_iter()
            .map(|wf| {
                let decision = decide(wf, &facts);
                DispatchDecision {
                    workflow: wf.name.clone(),
                    matched: decision.matched(),
                    reason: decision.reason().map(str::to_owned),
                    context: decision.matched().then(|| base_context(&facts)),
                    version: Some(wf.version.clone()),
                    ordered: wf.order == super::wait::Order::Conversation,
                }
            })
            .collect()
    }

    /// Answers without lookups (or with no answering workflow) are computed
    /// here, so they are stored in the event's own commit.
    fn setup_answer(
        &self,
        event: &NewEvent,
        after: Option<&ConversationState>,
    ) -> Option<PreparedAnswer> {
        let set = self.current();
        let prepared = |p: super::answer::Produced| PreparedAnswer {
            workflow: p.workflow,
            body: p.body,
            fallback_reason: p.fallback_reason,
        };
        if super::answer::answering(&set).next().is_none() {
            return Some(prepared(super::answer::Produced::empty()));
        }
        let event_json: serde_json::Value =
            serde_json::from_slice(&event.raw_body).unwrap_or_default();
        let facts = EventFacts {
            envelope: &event.envelope,
            event_json: &event_json,
            before: None,
            after,
        };
        match super::answer::choose(&set, &facts) {
            None => Some(prepared(super::answer::Produced::empty())),
            Some(wf) if wf.steps.is_empty() && wf.secrets.is_empty() => {
                Some(prepared(super::answer::render(wf, &base_context(&facts))))
            }
            Some(_) => None,
        }
    }
}
