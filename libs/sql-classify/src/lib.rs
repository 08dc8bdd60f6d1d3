//! Classifies SQL into agentgate's risk classes with the PostgreSQL grammar itself.
//!
//! pg-proxy asks, for every query an agent sends, "what does this do?", and decides from the
//! answer (allow, deny, hold for approval) with the session's policy. The answer must be the
//! one PostgreSQL would reach, so the text is parsed by libpg_query (PostgreSQL's own parser,
//! through the `pg_query` crate) and the parse tree is walked; no substring or regex ever
//! decides. A comment or a dollar-quoted string that says `DROP TABLE` is a comment or a
//! string, and a `DELETE` hidden in a CTE is a delete. Text the grammar rejects is an error,
//! which the proxy turns into a denial ([`ClassifyError`]).
//!
//! ```
//! use agentgate_sql_classify::{classify, risk};
//!
//! let classification = classify(
//!     "SELECT 1; WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone",
//! ).expect("valid SQL");
//! assert_eq!(classification.statements.len(), 2);
//! assert_eq!(classification.statements[0].risk_classes, [risk::READ]);
//! assert_eq!(
//!     classification.statements[1].risk_classes,
//!     [risk::READ, risk::WRITE, risk::WRITE_UNBOUNDED],
//! );
//! assert_eq!(classification.statements[1].tables, ["orders"]);
//! ```
//!
//! # Classes
//!
//! Each statement of a query is classified on its own, and its classes are the union of what
//! the statement is and of everything found anywhere in its tree. Names are those of the
//! policy catalog (`agentgate_policy::RISK_CLASSES`, re-stated in [`risk`]); a statement with
//! no class is evaluated by the policy as `none`.
//!
//! | statement | classes |
//! | --- | --- |
//! | `SELECT`, `VALUES`, `TABLE`, `FETCH`, `DECLARE … CURSOR`, `EXPLAIN` without `ANALYZE` | `sql.read` |
//! | `SELECT … FOR UPDATE/SHARE` | `sql.read` (with a note: it takes row locks) |
//! | `INSERT`, `MERGE`, `UPDATE`/`DELETE … WHERE …`, `REFRESH MATERIALIZED VIEW`, `LOCK`, `setval()`, `lo_unlink()` and other large-object writes | `sql.write` |
//! | `UPDATE`/`DELETE` without `WHERE` (or `WHERE true`, `WHERE 1 = 1`, `WHERE x OR true`), `TRUNCATE` | `sql.write`, `sql.write.unbounded` |
//! | `CREATE TABLE AS`, `SELECT INTO`, `CREATE MATERIALIZED VIEW` | `sql.ddl`, `sql.write` |
//! | `CREATE`/`ALTER`/`DROP` of tables, views, indexes, types, schemas, …; `COMMENT` | `sql.ddl` |
//! | `GRANT`, `REVOKE`, `CREATE`/`ALTER`/`DROP ROLE` (`USER`, `GROUP`), `ALTER DEFAULT PRIVILEGES` | `sql.dcl` |
//! | ownership (`ALTER … OWNER TO`, `REASSIGN`/`DROP OWNED`), row-level security policies and switches, user mappings, security labels | `sql.ddl`, `sql.dcl` |
//! | `COPY … TO STDOUT` / `COPY … FROM STDIN` | `sql.copy` + `sql.read` / `sql.write` |
//! | `COPY` to or from a server file | `sql.copy`, `sql.admin` + read or write |
//! | `COPY … PROGRAM` | `sql.copy`, `sql.admin`, `sql.opaque_code` + read or write |
//! | admin functions anywhere (`pg_terminate_backend`, `pg_cancel_backend`, `pg_read_file`, `pg_read_binary_file`, `pg_ls_dir`, `pg_stat_file`, `lo_import`, `lo_export`, `pg_reload_conf`, `pg_rotate_logfile`, `dblink*`, replication and backup control, statistics resets) | `sql.admin` |
//! | `SET ROLE`, `SET SESSION AUTHORIZATION`, `RESET ROLE`, `set_config('role', …)`, `set_config('session_authorization', …)`, `set_config` of a computed name, `DISCARD ALL` | `sql.admin` |
//! | `SET`/`set_config` of superuser settings that weaken integrity or the server log (`session_replication_role`, `log_*`, `debug_*`, …), and of `standard_conforming_strings` / `client_encoding` to anything but `on` / UTF-8 | `sql.admin` |
//! | `ALTER SYSTEM`, `VACUUM`, `ANALYZE`, `CLUSTER`, `REINDEX`, `CHECKPOINT`, two-phase commit (`PREPARE TRANSACTION`, `COMMIT`/`ROLLBACK PREPARED`) | `sql.admin` |
//! | databases, tablespaces, foreign-data wrappers, publications, subscriptions | `sql.ddl`, `sql.admin` |
//! | `LOAD` | `sql.admin`, `sql.opaque_code` |
//! | `DO`, `CALL`, `query_to_xml` and other functions that run SQL given as a string | `sql.opaque_code` |
//! | `CREATE FUNCTION`/`PROCEDURE`, `ALTER FUNCTION`, `CREATE TRIGGER`, `CREATE EVENT TRIGGER`, `CREATE RULE`, `CREATE LANGUAGE`, `CREATE`/`ALTER EXTENSION`, `CREATE ACCESS METHOD` | `sql.ddl`, `sql.opaque_code` |
//! | `EXPLAIN ANALYZE x` | the classes of `x` (it runs `x`) |
//! | `PREPARE p AS x` | the classes of `x`, so a forbidden statement is refused when it is prepared, not only when it runs |
//! | `EXECUTE p` | the classes of what `p` runs, through [`PreparedStatements`]; `sql.opaque_code` when `p` is unknown |
//! | `BEGIN`, `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `RELEASE`, `SET`/`RESET` of ordinary settings, `RESET ALL`, `SET CONSTRAINTS`, `SHOW`, `LISTEN`, `NOTIFY`, `UNLISTEN`, `DEALLOCATE`, `DISCARD PLANS`/`SEQUENCES`/`TEMP`, `CLOSE`, `MOVE` | none |
//! | any other statement | `sql.admin` (fail closed) |
//!
//! # Choices worth knowing
//!
//! - Switching identity (`SET ROLE`, `SET SESSION AUTHORIZATION`, and `set_config` of them)
//!   is `sql.admin`, not `sql.dcl`: it changes no privilege, it changes whose privileges the
//!   connection uses, escaping the role the grant gave. `sql.dcl` is kept for statements that
//!   change what privileges exist. The same switch is classified the same way whichever
//!   syntax does it.
//! - `DISCARD ALL` is `sql.admin`: it includes `SET SESSION AUTHORIZATION DEFAULT`.
//! - Functions are known by their unqualified name, whatever the schema. A user-defined
//!   function (or a view, a trigger, a rule, a default expression) may do anything its owner
//!   may; the classifier sees only its call, which is classified by what the calling
//!   statement is (a `SELECT` of `my_function()` is `sql.read`). Limiting what agents may
//!   create (`sql.opaque_code`) is what keeps such functions trustworthy.
//! - `EXPLAIN` without `ANALYZE` plans but does not run its statement: `sql.read`, whatever
//!   the statement. With `ANALYZE` (`EXPLAIN ANALYZE`, `EXPLAIN (ANALYZE)`,
//!   `EXPLAIN (ANALYZE true)`) it is classified as what it runs.
//! - Definitions are classified by everything they contain: `CREATE VIEW v AS SELECT
//!   pg_read_file(…)` is `sql.ddl` and `sql.admin`, a `CREATE RULE` whose action deletes is
//!   also `sql.write`; the code runs later, where the classifier cannot see it.
//! - `SELECT … FOR UPDATE` stays `sql.read`, with a note, since it changes no data.
//! - `nextval()` is not a write: it is in nearly every `INSERT` default and only advances a
//!   sequence. `setval()` is.
//! - Tables are listed as written (`schema.table` when qualified; names the parser folded to
//!   lower case). An unqualified name equal to a CTE name anywhere in the statement is taken
//!   to be the CTE and left out, except as the target of a write.
//!
//! # What the proxy must uphold
//!
//! - The classifier parses with `standard_conforming_strings = on` (PostgreSQL's default
//!   since 9.1) and reads UTF-8 text. A server or session where either differs reads some
//!   texts differently (a backslash can end a string for one and not for the other). The
//!   classifier flags attempts to change them, but the proxy must also check the server's
//!   `ParameterStatus` for `standard_conforming_strings` and `client_encoding` (both are
//!   reported at startup and on every change) and stop forwarding when they differ.
//! - Texts longer than [`MAX_SQL_LEN`] are refused ([`ClassifyError::TooLong`]), and so are
//!   statements nesting deeper than the parse tree decoder allows (about 20 levels of
//!   subqueries; [`ClassifyError::TooComplex`]).
//! - `EXECUTE` and extended-protocol statement names are session state: keep one
//!   [`PreparedStatements`] per upstream connection and tell it what the server confirmed.
//!
//! # Costs
//!
//! Classification parses the text and walks the tree's serialization; [`Classifier`] caches
//! the result by text, shared by all sessions, so a repeated or prepared statement pays it
//! once and later lookups cost a hash and a reference count.

#![warn(missing_docs)]

mod analyze;
mod cache;
mod error;
pub mod risk;
mod session;
mod shape;

use std::ops::Range;
use std::sync::Arc;

pub use cache::{CacheStats, Classifier};
pub use error::ClassifyError;
pub use session::PreparedStatements;

use risk::ClassSet;

/// The longest text, in bytes, the classifier accepts. A query is parsed whole before any
/// part of it is forwarded, so the bound is what one query can cost the proxy in memory and
/// time; 1 MiB is far above hand-written or ORM-generated SQL, and bulk data belongs in
/// `COPY … FROM STDIN`, whose data rows are not SQL text.
pub const MAX_SQL_LEN: usize = 1024 * 1024;

/// Classifies every statement of `sql` (a simple-protocol query string, or the text of an
/// extended-protocol `Parse`), without a cache. Proxies should use a shared [`Classifier`]
/// instead; this is the same classification for tools and tests.
///
/// An empty text or one holding only comments has no statements, hence no classes.
///
/// # Errors
///
/// Any [`ClassifyError`] means the text must not be forwarded: PostgreSQL's grammar rejects
/// it, or it is beyond the classifier's bounds.
pub fn classify(sql: &str) -> Result<Classification, ClassifyError> {
    analyze::classify(sql)
}

/// What a query does, statement by statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The statements in the order they appear in the text. A multi-statement query runs
    /// as one implicit transaction, but each statement is decided on its own so that the
    /// record says which one needed what.
    pub statements: Vec<StatementClass>,
}

impl Classification {
    /// The union of every statement's classes, in catalog order: what one decision for the
    /// whole query (a simple-protocol `Query` message is forwarded whole or not at all) must
    /// weigh. Empty means "none".
    pub fn risk_classes(&self) -> Vec<&'static str> {
        let mut classes = ClassSet::EMPTY;
        for statement in &self.statements {
            classes.add(ClassSet::from_names(&statement.risk_classes));
        }
        classes.names()
    }

    /// Every table the query names, each once, in order of first appearance: for the audit
    /// record and for approvers.
    pub fn tables(&self) -> Vec<&str> {
        let mut tables: Vec<&str> = Vec::new();
        for statement in &self.statements {
            for table in &statement.tables {
                if !tables.contains(&table.as_str()) {
                    tables.push(table);
                }
            }
        }
        tables
    }
}

/// What one statement does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementClass {
    /// The statement's risk classes, in catalog order, each a name from [`risk::ALL`]
    /// (hence from the policy's `RISK_CLASSES`). Empty means "none" (transaction control,
    /// ordinary settings, …), which the policy's `none` rule or default decides.
    pub risk_classes: Vec<&'static str>,
    /// The command, as PostgreSQL names it in its command tags (`SELECT`, `DELETE`,
    /// `CREATE TABLE`, `ALTER ROLE`, `BEGIN`, …); for `EXPLAIN` and `PREPARE` the wrapper's
    /// name. `UNKNOWN` for a statement the classifier does not know.
    pub command: String,
    /// The tables (and views, sequences) the statement names, as written: `schema.table`
    /// when qualified. Informative: for the record and for approvers, not a security
    /// boundary (a view or function can reach tables it does not name).
    pub tables: Vec<String>,
    /// Where the statement is in the classified text, in bytes, without surrounding
    /// whitespace and without its terminating semicolon.
    pub span: Range<usize>,
    /// The statement's text (the text at [`Self::span`]), for the audit record.
    pub text: String,
    /// Caveats worth showing an approver, e.g. that `SELECT … FOR UPDATE` locks rows or
    /// that an `EXECUTE` refers to a statement this session never prepared.
    pub notes: Vec<&'static str>,
    /// For `COPY … TO STDOUT`: the query whose rows it sends (the parenthesized query, or
    /// `SELECT columns FROM table`), so a proxy can describe it and mask the copied
    /// columns by their source.
    pub copy_source: Option<String>,
    /// The classes of the statement itself, before `EXECUTE`s are resolved.
    pub(crate) base: ClassSet,
    /// The prepared statements it executes (`EXECUTE`, `EXPLAIN ANALYZE EXECUTE`,
    /// `CREATE TABLE … AS EXECUTE`).
    pub(crate) executes: Vec<String>,
    /// What it does to the session's prepared statements.
    pub(crate) session: SessionEffect,
}

impl StatementClass {
    /// Approximate heap bytes of the session effect, for the cache's byte bound.
    pub(crate) fn session_cost(&self) -> usize {
        match &self.session {
            SessionEffect::Prepare { name, body } => {
                name.len()
                    + body
                        .statements
                        .iter()
                        .map(|statement| 128 + statement.text.len())
                        .sum::<usize>()
            }
            SessionEffect::Deallocate { name } => name.as_ref().map_or(0, String::len),
            SessionEffect::None => 0,
        }
    }
}

/// What a statement does to the session's prepared statements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum SessionEffect {
    #[default]
    None,
    /// `PREPARE name AS body`.
    Prepare {
        name: String,
        body: Arc<Classification>,
    },
    /// `DEALLOCATE name`; `None` for `DEALLOCATE ALL` and `DISCARD ALL`.
    Deallocate { name: Option<String> },
}

/// The texts of [`StatementClass::notes`].
pub(crate) mod notes {
    pub(crate) const LOCKS_ROWS: &str =
        "SELECT … FOR UPDATE/SHARE locks the rows it reads until the transaction ends";
    pub(crate) const LOCKS_TABLES: &str =
        "LOCK holds table locks until the transaction ends and can block other sessions";
    pub(crate) const EXPLAIN_ONLY: &str =
        "EXPLAIN without ANALYZE plans the statement but does not run it";
    pub(crate) const UNKNOWN_PREPARED: &str = "EXECUTE of a prepared statement this session \
         has not prepared: what it runs is unknown, classified as opaque code";
    pub(crate) const UNKNOWN_STATEMENT: &str =
        "statement type unknown to agentgate: classified as admin";
}
