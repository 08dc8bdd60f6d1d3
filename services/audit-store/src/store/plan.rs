//! What an append does, independent of the database: skip what is stored already, link the
//! rest onto the chain, and sum up the session index.

use std::collections::{HashMap, HashSet};

use super::{Gap, Head, SessionRow, StoredRow};

/// An event validated by the service and ready to be chained.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub session_id: String,
    pub session_sequence: i64,
    pub occurred_at_us: i64,
    pub kind: String,
    pub principal: String,
    pub connection: String,
    pub protocol: i32,
    pub role: String,
    pub source_address: String,
    /// The encoded `AuditEvent`: the bytes the chain hash covers.
    pub body: Vec<u8>,
}

/// What became of one batch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    pub stored: u32,
    pub duplicates: u32,
    /// Holes in the sessions this batch touched.
    pub gaps: Vec<Gap>,
}

/// The rows to write for a group of batches, and how each batch fared.
pub(super) struct Plan {
    pub rows: Vec<StoredRow>,
    pub sessions: Vec<SessionRow>,
    pub outcomes: Vec<AppendOutcome>,
    /// Sessions each batch touched, to hand out gaps afterwards.
    pub touched: Vec<HashSet<String>>,
    pub head: Head,
}

impl Plan {
    /// Keys to look up before planning: the (session, sequence) of every event.
    pub fn keys(batches: &[Vec<NewEvent>]) -> Vec<(String, i64)> {
        batches
            .iter()
            .flatten()
            .map(|e| (e.session_id.clone(), e.session_sequence))
            .collect()
    }

    /// Links every new event onto the chain after `head`, in arrival order.
    pub fn new(
        batches: Vec<Vec<NewEvent>>,
        existing: &HashSet<(String, i64)>,
        head: Head,
        now_us: i64,
    ) -> Plan {
        let mut seen: HashSet<(String, i64)> = HashSet::new();
        let mut rows = Vec::new();
        let mut sessions: HashMap<String, SessionRow> = HashMap::new();
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut touched = Vec::with_capacity(batches.len());
        let mut head = head;
        for batch in batches {
            let mut outcome = AppendOutcome::default();
            let mut batch_sessions = HashSet::new();
            for e in batch {
                batch_sessions.insert(e.session_id.clone());
                let key = (e.session_id.clone(), e.session_sequence);
                if existing.contains(&key) || !seen.insert(key) {
                    outcome.duplicates += 1;
                    continue;
                }
                outcome.stored += 1;
                let s = sessions
                    .entry(e.session_id.clone())
                    .or_insert_with(|| SessionRow {
                        session_id: e.session_id.clone(),
                        principal: e.principal.clone(),
                        connection: e.connection.clone(),
                        protocol: e.protocol,
                        role: e.role.clone(),
                        source_address: e.source_address.clone(),
                        first_event_us: e.occurred_at_us,
                        last_event_us: e.occurred_at_us,
                        events: 0,
                        last_sequence: 0,
                    });
                s.events += 1;
                s.first_event_us = s.first_event_us.min(e.occurred_at_us);
                s.last_event_us = s.last_event_us.max(e.occurred_at_us);
                s.last_sequence = s.last_sequence.max(e.session_sequence);
                fill(&mut s.principal, &e.principal);
                fill(&mut s.connection, &e.connection);
                fill(&mut s.role, &e.role);
                fill(&mut s.source_address, &e.source_address);
                if s.protocol == 0 {
                    s.protocol = e.protocol;
                }

                let mut row = StoredRow {
                    chain_sequence: head.chain_sequence as i64 + 1,
                    stored_at_us: now_us,
                    session_id: e.session_id,
                    session_sequence: e.session_sequence,
                    occurred_at_us: e.occurred_at_us,
                    kind: e.kind,
                    principal: e.principal,
                    connection: e.connection,
                    protocol: e.protocol,
                    body: e.body,
                    hash: Vec::new(),
                };
                let hash = row.record().hash(&head.hash);
                row.hash = hash.to_vec();
                head = Head {
                    chain_sequence: row.chain_sequence as u64,
                    hash,
                };
                rows.push(row);
            }
            outcomes.push(outcome);
            touched.push(batch_sessions);
        }
        Plan {
            rows,
            sessions: sessions.into_values().collect(),
            outcomes,
            touched,
            head,
        }
    }

    /// Hands each batch the gaps of the sessions it touched.
    pub fn with_gaps(mut self, gaps: &[Gap]) -> Vec<AppendOutcome> {
        for (outcome, touched) in self.outcomes.iter_mut().zip(&self.touched) {
            outcome.gaps = gaps
                .iter()
                .filter(|g| touched.contains(&g.session_id))
                .cloned()
                .collect();
        }
        self.outcomes
    }
}

fn fill(slot: &mut String, value: &str) {
    if slot.is_empty() && !value.is_empty() {
        *slot = value.to_owned();
    }
}

/// The chain head and the last checkpoint's sequence, from the newest event and the newest
/// checkpoint (each as sequence and hash). After a prune that removed every event, the
/// newest checkpoint is the head.
pub(super) fn head_from(
    event: Option<(i64, Vec<u8>)>,
    checkpoint: Option<(i64, Vec<u8>)>,
) -> Result<(Head, u64), super::StoreError> {
    let last_checkpoint = checkpoint.as_ref().map(|c| c.0 as u64).unwrap_or(0);
    let (sequence, hash) = match (event, checkpoint) {
        (Some(e), Some(c)) if c.0 > e.0 => c,
        (Some(e), _) => e,
        (None, Some(c)) => c,
        (None, None) => (0, agentgate_audit_chain::GENESIS.to_vec()),
    };
    let hash = agentgate_audit_chain::to_hash(&hash).ok_or_else(|| {
        super::StoreError::Invalid(format!("stored hash at {sequence} is not 32 bytes"))
    })?;
    Ok((
        Head {
            chain_sequence: sequence as u64,
            hash,
        },
        last_checkpoint,
    ))
}

/// Whether the head has moved `every` events past the last checkpoint.
pub(super) fn checkpoint_due(head: u64, last_checkpoint: u64, every: u64) -> bool {
    every > 0 && head >= last_checkpoint + every
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_audit_chain::GENESIS;

    fn ev(session: &str, seq: i64) -> NewEvent {
        NewEvent {
            session_id: session.into(),
            session_sequence: seq,
            occurred_at_us: seq,
            kind: "k".into(),
            principal: "p".into(),
            connection: "c".into(),
            protocol: 1,
            role: "r".into(),
            source_address: "a".into(),
            body: vec![seq as u8],
        }
    }

    #[test]
    fn duplicates_within_and_across_batches_are_skipped() {
        let existing = HashSet::from([("a".to_string(), 1)]);
        let head = Head {
            chain_sequence: 7,
            hash: GENESIS,
        };
        let plan = Plan::new(
            vec![
                vec![ev("a", 1), ev("a", 2), ev("a", 2)],
                vec![ev("a", 2), ev("b", 1)],
            ],
            &existing,
            head,
            0,
        );
        assert_eq!(plan.rows.len(), 2);
        assert_eq!(plan.rows[0].chain_sequence, 8);
        assert_eq!(plan.rows[1].chain_sequence, 9);
        assert_eq!(
            plan.outcomes[0],
            AppendOutcome {
                stored: 1,
                duplicates: 2,
                gaps: vec![]
            }
        );
        assert_eq!(
            plan.outcomes[1],
            AppendOutcome {
                stored: 1,
                duplicates: 1,
                gaps: vec![]
            }
        );
        assert_eq!(plan.head.hash.to_vec(), plan.rows[1].hash);
    }

    #[test]
    fn checkpoint_cadence() {
        assert!(!checkpoint_due(9, 0, 10));
        assert!(checkpoint_due(10, 0, 10));
        assert!(!checkpoint_due(10, 0, 0));
    }
}
