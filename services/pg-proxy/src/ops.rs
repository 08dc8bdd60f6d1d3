//! One statement as the proxy sees it: classified, decided, then completed by the server's
//! answer; recorded when it ends.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use agentgate_policy::LocalDecision;
use agentgate_proto::common::v1::{Decision, Operation};

/// A statement in flight, from the moment the agent sent it to the server's answer.
#[derive(Debug, Clone)]
pub struct OpRecord {
    /// The operation as classified (text, targets, risk classes, command); shared with the
    /// prepared statement it runs, if any.
    pub operation: Arc<Operation>,
    /// What policy decided, after any approval.
    pub decision: Decision,
    /// Why (policy reason, approval outcome).
    pub reason: String,
    /// The risk class of the rule that decided, if one did (recorded as `decided_by`).
    pub rule: Option<String>,
    /// The approval request that released or refused it.
    pub approval_id: Option<String>,
    /// Bind parameters, already masked, for the record.
    pub parameters: Vec<String>,
    /// When the agent sent it.
    pub started_at: SystemTime,
    /// For the duration.
    pub started: Instant,
    /// Rows returned or touched.
    pub rows: u64,
    /// Result bytes sent to the agent.
    pub bytes: u64,
    /// The error the agent saw, if any.
    pub error: Option<String>,
    /// Masking counts per rule.
    pub masked: agentgate_masking::MaskReport,
    /// The marker the proxy put in a refused statement's stand-in, to recognise the
    /// server's error for it and put the refusal in its place.
    pub denial: Option<Denial>,
    /// Set when the statement never ran (an earlier error in its pipeline).
    pub skipped: bool,
    /// Set when it ran and the server undid it: a later statement of the same simple Query
    /// failed and took the Query's implicit transaction with it.
    pub rolled_back: bool,
    /// For COPY TO STDOUT: the query whose rows it sends, to learn their columns' sources.
    pub copy_source: Option<String>,
}

/// A refused statement's stand-in: the server answers it with an error naming `marker`,
/// which the proxy replaces with `error` (SQLSTATE 42501 and the policy's reason). Going
/// through the server keeps its transaction state exact: inside a transaction block the
/// block is aborted, as Postgres itself would on an error.
#[derive(Debug, Clone)]
pub struct Denial {
    /// Unique text the server's error will quote.
    pub marker: String,
    /// The ErrorResponse the agent gets instead.
    pub error: agentgate_pgwire::Frame,
}

/// A policy decision as the relay keeps it: the deciding rule by its risk class only.
#[derive(Debug, Clone)]
pub struct Decided {
    /// Allow, deny or needs approval.
    pub decision: Decision,
    /// Why, in one line.
    pub reason: String,
    /// The risk class of the rule that decided, if one did.
    pub rule: Option<String>,
}

impl From<LocalDecision> for Decided {
    fn from(d: LocalDecision) -> Decided {
        Decided {
            decision: d.decision,
            reason: d.reason,
            rule: d.rule.map(|r| r.risk_class),
        }
    }
}

impl OpRecord {
    /// A statement the agent just sent, as policy decided it.
    pub fn new(operation: impl Into<Arc<Operation>>, decided: Decided) -> OpRecord {
        let Decided {
            decision,
            reason,
            rule,
        } = decided;
        OpRecord {
            operation: operation.into(),
            decision,
            reason,
            rule,
            approval_id: None,
            parameters: Vec::new(),
            started_at: SystemTime::now(),
            started: Instant::now(),
            rows: 0,
            bytes: 0,
            error: None,
            masked: Default::default(),
            denial: None,
            skipped: false,
            rolled_back: false,
            copy_source: None,
        }
    }
}
