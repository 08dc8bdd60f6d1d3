//! From SQL text to a [`Classification`]: parse with libpg_query, then look at each
//! statement twice.
//!
//! 1. A typed match on the statement's node decides what the statement itself is (its
//!    command tag and its own classes: `GRANT` is DCL, `DO` is opaque code, …) and unwraps
//!    the statements that run another one (`EXPLAIN ANALYZE`, `PREPARE`, `CREATE SCHEMA`'s
//!    elements). Anything the match does not know is [`ClassSet::ADMIN`]: fail closed.
//! 2. A walk over the *whole* tree finds what the statement does wherever it is written:
//!    a `DELETE` in a CTE, `pg_terminate_backend` in a `WHERE`, `EXECUTE` of a prepared
//!    statement, every table it names. pg_query's own node iterator skips node types it does
//!    not care about, and a hand-written walker over ~270 node types would miss the next one
//!    PostgreSQL adds; the walk therefore runs over the tree's serde serialization, which
//!    covers every field of every node by construction. Its cost is paid once per distinct
//!    text thanks to the cache ([`crate::Classifier`]).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

use pg_query::protobuf::{
    self, DiscardMode, ObjectType, RoleStmtType, TransactionStmtKind, VariableSetKind,
    node::Node as N,
};
use serde_json::{Map, Value};

use crate::error::{self, ClassifyError};
use crate::risk::ClassSet;
use crate::{Classification, MAX_SQL_LEN, SessionEffect, StatementClass, notes};

/// Functions that operate the server, its files or other servers: [`ClassSet::ADMIN`]
/// wherever they are called. Matched on the unqualified name, whatever the schema, so that
/// `pg_catalog.pg_read_file` and a same-named wrapper are treated alike.
const ADMIN_FUNCTIONS: &[&str] = &[
    // other sessions
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_log_backend_memory_contexts",
    // server files
    "pg_read_file",
    "pg_read_file_old",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "pg_ls_summariesdir",
    "pg_stat_file",
    "pg_file_write",
    "pg_file_sync",
    "pg_file_unlink",
    "pg_file_rename",
    "pg_logdir_ls",
    "lo_import",
    "lo_export",
    // configuration, logs, WAL, backups, replication
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_rotate_logfile_old",
    "pg_promote",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_copy_physical_replication_slot",
    "pg_copy_logical_replication_slot",
    "pg_replication_slot_advance",
    "pg_sync_replication_slots",
    "pg_logical_slot_get_changes",
    "pg_logical_slot_peek_changes",
    "pg_logical_slot_get_binary_changes",
    "pg_logical_slot_peek_binary_changes",
    "pg_logical_emit_message",
    "pg_replication_origin_create",
    "pg_replication_origin_drop",
    "pg_replication_origin_advance",
    "pg_replication_origin_session_setup",
    "pg_import_system_collations",
    // statistics the planner and monitoring rely on
    "pg_stat_reset",
    "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters",
    "pg_stat_reset_single_function_counters",
    "pg_stat_reset_slru",
    "pg_stat_reset_replication_slot",
    "pg_stat_reset_subscription_stats",
    "pg_stat_statements_reset",
    "pg_restore_relation_stats",
    "pg_clear_relation_stats",
    "pg_restore_attribute_stats",
    "pg_clear_attribute_stats",
];

/// Function name prefixes that are [`ClassSet::ADMIN`]: dblink opens connections to other
/// servers (and `dblink_exec` runs anything there).
const ADMIN_FUNCTION_PREFIXES: &[&str] = &["dblink"];

/// Functions that run SQL handed to them as a string: what they run cannot be seen in the
/// tree, so they are [`ClassSet::OPAQUE_CODE`].
const OPAQUE_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "ts_stat",
];

/// Built-in functions that change data although they are called from a `SELECT`:
/// [`ClassSet::WRITE`]. (`nextval` is left out on purpose: it is in nearly every insert and
/// only advances a sequence.)
const WRITE_FUNCTIONS: &[&str] = &[
    "setval",
    "lo_create",
    "lo_creat",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lowrite",
    "lo_truncate",
    "lo_truncate64",
];

/// Settings that switch the identity the session acts as: changing them by `SET`, `RESET`
/// or `set_config` is [`ClassSet::ADMIN`].
const IDENTITY_SETTINGS: &[&str] = &["role", "session_authorization"];

/// Settings only a superuser may change and that weaken integrity or the server's own
/// audit trail (plus every `log_*` and `debug_*` setting): [`ClassSet::ADMIN`].
const SUPERUSER_SETTINGS: &[&str] = &[
    "session_replication_role",
    "allow_system_table_mods",
    "allow_in_place_tablespaces",
    "zero_damaged_pages",
    "ignore_checksum_failure",
    "ignore_system_indexes",
    "ignore_invalid_pages",
    "lo_compat_privileges",
    "session_preload_libraries",
    "local_preload_libraries",
    "dynamic_library_path",
    "track_activities",
    "track_counts",
];
const SUPERUSER_SETTING_PREFIXES: &[&str] = &["log_", "debug_"];

/// Parses and classifies `sql`; the uncached core of [`crate::classify`].
pub(crate) fn classify(sql: &str) -> Result<Classification, ClassifyError> {
    if sql.len() > MAX_SQL_LEN {
        return Err(ClassifyError::TooLong {
            len: sql.len(),
            max: MAX_SQL_LEN,
        });
    }
    let parsed = pg_query::parse(sql, 0).map_err(|error| error::from_pg_query(sql, error))?;
    let mut statements = Vec::with_capacity(parsed.protobuf.stmts.len());
    for raw in &parsed.protobuf.stmts {
        let span = span_of(sql, raw.stmt_location, raw.stmt_len);
        let text = &sql[span.clone()];
        let analysis = match raw.stmt.as_deref().and_then(|node| node.node.as_ref()) {
            Some(node) => analyze(node, &span, text)?,
            None => Analysis::unknown(),
        };
        statements.push(analysis.into_statement(span, text));
    }
    Ok(Classification { statements })
}

/// The byte range of one statement, without surrounding whitespace. libpg_query gives
/// `stmt_len == 0` for "up to the end of the text".
fn span_of(sql: &str, location: i32, len: i32) -> Range<usize> {
    let start = usize::try_from(location).unwrap_or(0).min(sql.len());
    let end = match usize::try_from(len) {
        Ok(0) | Err(_) => sql.len(),
        Ok(len) => start.saturating_add(len).min(sql.len()),
    };
    match sql.get(start..end) {
        Some(text) => {
            let leading = text.len() - text.trim_start().len();
            let trimmed = text.trim();
            start + leading..start + leading + trimmed.len()
        }
        None => 0..sql.len(),
    }
}

/// One table named in a statement, before CTE names are told apart from tables.
#[derive(Debug, Clone)]
struct TableRef {
    location: i64,
    name: String,
    relname: String,
    qualified: bool,
    /// The relation an INSERT/UPDATE/DELETE/MERGE writes: never a CTE.
    target: bool,
}

/// What is known about one statement while it is being analyzed.
#[derive(Debug, Clone, Default)]
struct Analysis {
    command: String,
    classes: ClassSet,
    tables: Vec<TableRef>,
    ctes: HashSet<String>,
    executes: Vec<String>,
    notes: Vec<&'static str>,
    session: SessionEffect,
    copy_source: Option<String>,
}

impl Analysis {
    fn new(command: impl Into<String>, classes: ClassSet) -> Analysis {
        Analysis {
            command: command.into(),
            classes,
            ..Analysis::default()
        }
    }

    fn unknown() -> Analysis {
        let mut analysis = Analysis::new("UNKNOWN", ClassSet::ADMIN);
        analysis.note(notes::UNKNOWN_STATEMENT);
        analysis
    }

    fn note(&mut self, note: &'static str) {
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }

    /// Everything `other` found, as part of this statement.
    fn absorb(&mut self, other: Analysis) {
        self.classes.add(other.classes);
        self.tables.extend(other.tables);
        self.ctes.extend(other.ctes);
        for name in other.executes {
            if !self.executes.contains(&name) {
                self.executes.push(name);
            }
        }
        for note in other.notes {
            self.note(note);
        }
    }

    fn table_names(&self) -> Vec<String> {
        let mut kept: Vec<&TableRef> = self
            .tables
            .iter()
            .filter(|table| table.target || table.qualified || !self.ctes.contains(&table.relname))
            .collect();
        kept.sort_by_key(|table| table.location);
        let mut names: Vec<String> = Vec::with_capacity(kept.len());
        for table in kept {
            if !names.contains(&table.name) {
                names.push(table.name.clone());
            }
        }
        names
    }

    fn into_statement(self, span: Range<usize>, text: &str) -> StatementClass {
        let tables = self.table_names();
        let mut notes = self.notes;
        let mut resolved = self.classes;
        if !self.executes.is_empty() {
            resolved.add(ClassSet::OPAQUE_CODE);
            notes.push(notes::UNKNOWN_PREPARED);
        }
        StatementClass {
            risk_classes: resolved.names(),
            command: self.command,
            tables,
            span,
            text: text.to_owned(),
            notes,
            copy_source: self.copy_source,
            base: self.classes,
            executes: self.executes,
            session: self.session,
        }
    }
}

/// Classifies one statement node (see the module docs for the two passes).
fn analyze(node: &N, span: &Range<usize>, text: &str) -> Result<Analysis, ClassifyError> {
    let mut analysis = match node {
        // Statements that run another statement: classify what actually runs.
        N::ExplainStmt(explain) => {
            let inner = explain.query.as_deref().and_then(|node| node.node.as_ref());
            if explain_analyzes(&explain.options) {
                let mut analysis = match inner {
                    Some(inner) => analyze(inner, span, text)?,
                    None => Analysis::unknown(),
                };
                analysis.command = "EXPLAIN".to_owned();
                analysis.session = SessionEffect::None;
                return Ok(analysis);
            }
            let mut analysis = Analysis::new("EXPLAIN", ClassSet::READ);
            analysis.note(notes::EXPLAIN_ONLY);
            if let Some(inner) = inner {
                walk(inner, &mut analysis, false)?;
            }
            return Ok(analysis);
        }
        N::PrepareStmt(prepare) => {
            let body = match prepare.query.as_deref().and_then(|node| node.node.as_ref()) {
                Some(inner) => analyze(inner, span, text)?,
                None => Analysis::unknown(),
            };
            let mut analysis = body.clone();
            analysis.command = "PREPARE".to_owned();
            analysis.session = SessionEffect::Prepare {
                name: prepare.name.clone(),
                body: Arc::new(Classification {
                    statements: vec![body.into_statement(span.clone(), text)],
                }),
            };
            // The argument types cannot hold anything that runs.
            return Ok(analysis);
        }
        N::CreateSchemaStmt(schema) => {
            let mut analysis = Analysis::new("CREATE SCHEMA", ClassSet::DDL);
            for element in &schema.schema_elts {
                if let Some(element) = element.node.as_ref() {
                    analysis.absorb(analyze(element, span, text)?);
                }
            }
            analysis.command = "CREATE SCHEMA".to_owned();
            analysis.session = SessionEffect::None;
            analysis
        }

        // Reads.
        N::SelectStmt(select) => {
            if select.into_clause.is_some() {
                // Like CREATE TABLE AS: the walk adds sql.ddl and sql.write.
                Analysis::new("SELECT INTO", ClassSet::EMPTY)
            } else {
                Analysis::new("SELECT", ClassSet::READ)
            }
        }
        N::DeclareCursorStmt(_) => Analysis::new("DECLARE CURSOR", ClassSet::READ),
        N::FetchStmt(fetch) if fetch.ismove => Analysis::new("MOVE", ClassSet::EMPTY),
        N::FetchStmt(_) => Analysis::new("FETCH", ClassSet::READ),

        // Writes (the walk adds sql.write and sql.write.unbounded for the DML nodes).
        N::InsertStmt(_) => Analysis::new("INSERT", ClassSet::EMPTY),
        N::UpdateStmt(_) => Analysis::new("UPDATE", ClassSet::EMPTY),
        N::DeleteStmt(_) => Analysis::new("DELETE", ClassSet::EMPTY),
        N::MergeStmt(_) => Analysis::new("MERGE", ClassSet::EMPTY),
        N::TruncateStmt(_) => Analysis::new(
            "TRUNCATE TABLE",
            ClassSet::WRITE | ClassSet::WRITE_UNBOUNDED,
        ),
        N::CreateTableAsStmt(ctas) => {
            let command = if ctas.is_select_into {
                "SELECT INTO"
            } else if ctas.objtype == ObjectType::ObjectMatview as i32 {
                "CREATE MATERIALIZED VIEW"
            } else {
                "CREATE TABLE AS"
            };
            Analysis::new(command, ClassSet::DDL | ClassSet::WRITE)
        }
        N::RefreshMatViewStmt(_) => Analysis::new("REFRESH MATERIALIZED VIEW", ClassSet::WRITE),
        N::LockStmt(_) => {
            let mut analysis = Analysis::new("LOCK TABLE", ClassSet::WRITE);
            analysis.note(notes::LOCKS_TABLES);
            analysis
        }
        N::CopyStmt(copy) => {
            let mut classes = ClassSet::COPY;
            classes.add(if copy.is_from {
                ClassSet::WRITE
            } else {
                ClassSet::READ
            });
            if copy.is_program {
                classes.add(ClassSet::ADMIN | ClassSet::OPAQUE_CODE);
            } else if !copy.filename.is_empty() {
                classes.add(ClassSet::ADMIN);
            }
            let mut analysis = Analysis::new("COPY", classes);
            if !copy.is_from && !copy.is_program && copy.filename.is_empty() {
                analysis.copy_source = copy_source(copy, text);
            }
            analysis
        }

        // Prepared statements and cursors: the session effects are applied by
        // `PreparedStatements`; EXECUTE is resolved there (the walk records the name).
        N::ExecuteStmt(_) => Analysis::new("EXECUTE", ClassSet::EMPTY),
        N::DeallocateStmt(deallocate) => {
            let mut analysis = Analysis::new(
                if deallocate.isall {
                    "DEALLOCATE ALL"
                } else {
                    "DEALLOCATE"
                },
                ClassSet::EMPTY,
            );
            analysis.session = SessionEffect::Deallocate {
                name: (!deallocate.isall).then(|| deallocate.name.clone()),
            };
            analysis
        }
        N::ClosePortalStmt(_) => Analysis::new("CLOSE CURSOR", ClassSet::EMPTY),

        // Transaction control and harmless session statements: no class.
        N::TransactionStmt(transaction) => transaction_stmt(transaction),
        N::VariableSetStmt(set) => variable_set(set),
        N::VariableShowStmt(_) => Analysis::new("SHOW", ClassSet::EMPTY),
        N::ConstraintsSetStmt(_) => Analysis::new("SET CONSTRAINTS", ClassSet::EMPTY),
        N::ListenStmt(_) => Analysis::new("LISTEN", ClassSet::EMPTY),
        N::UnlistenStmt(_) => Analysis::new("UNLISTEN", ClassSet::EMPTY),
        N::NotifyStmt(_) => Analysis::new("NOTIFY", ClassSet::EMPTY),
        N::DiscardStmt(discard) => match DiscardMode::try_from(discard.target) {
            // DISCARD ALL includes SET SESSION AUTHORIZATION DEFAULT: an identity switch.
            Ok(DiscardMode::DiscardAll) => {
                let mut analysis = Analysis::new("DISCARD ALL", ClassSet::ADMIN);
                analysis.session = SessionEffect::Deallocate { name: None };
                analysis
            }
            Ok(DiscardMode::DiscardPlans) => Analysis::new("DISCARD PLANS", ClassSet::EMPTY),
            Ok(DiscardMode::DiscardSequences) => {
                Analysis::new("DISCARD SEQUENCES", ClassSet::EMPTY)
            }
            Ok(DiscardMode::DiscardTemp) => Analysis::new("DISCARD TEMP", ClassSet::EMPTY),
            _ => Analysis::unknown(),
        },

        // Code whose effect the text does not show.
        N::DoStmt(_) => Analysis::new("DO", ClassSet::OPAQUE_CODE),
        N::CallStmt(_) => Analysis::new("CALL", ClassSet::OPAQUE_CODE),
        N::CreateFunctionStmt(function) => Analysis::new(
            if function.is_procedure {
                "CREATE PROCEDURE"
            } else {
                "CREATE FUNCTION"
            },
            ClassSet::DDL | ClassSet::OPAQUE_CODE,
        ),
        N::AlterFunctionStmt(function) => Analysis::new(
            format!("ALTER {}", object_name(function.objtype)),
            ClassSet::DDL | ClassSet::OPAQUE_CODE,
        ),
        N::CreateTrigStmt(trigger) => Analysis::new(
            if trigger.isconstraint {
                "CREATE CONSTRAINT TRIGGER"
            } else {
                "CREATE TRIGGER"
            },
            ClassSet::DDL | ClassSet::OPAQUE_CODE,
        ),
        N::CreateEventTrigStmt(_) => Analysis::new(
            "CREATE EVENT TRIGGER",
            ClassSet::DDL | ClassSet::OPAQUE_CODE,
        ),
        N::AlterEventTrigStmt(_) => {
            Analysis::new("ALTER EVENT TRIGGER", ClassSet::DDL | ClassSet::OPAQUE_CODE)
        }
        N::RuleStmt(_) => Analysis::new("CREATE RULE", ClassSet::DDL | ClassSet::OPAQUE_CODE),
        N::CreatePlangStmt(_) => {
            Analysis::new("CREATE LANGUAGE", ClassSet::DDL | ClassSet::OPAQUE_CODE)
        }
        N::CreateExtensionStmt(_) => {
            Analysis::new("CREATE EXTENSION", ClassSet::DDL | ClassSet::OPAQUE_CODE)
        }
        N::AlterExtensionStmt(_) => {
            Analysis::new("ALTER EXTENSION", ClassSet::DDL | ClassSet::OPAQUE_CODE)
        }
        N::AlterExtensionContentsStmt(_) => Analysis::new("ALTER EXTENSION", ClassSet::DDL),
        N::CreateAmStmt(_) => Analysis::new(
            "CREATE ACCESS METHOD",
            ClassSet::DDL | ClassSet::OPAQUE_CODE,
        ),
        N::LoadStmt(_) => Analysis::new("LOAD", ClassSet::ADMIN | ClassSet::OPAQUE_CODE),

        // Operating the server.
        N::AlterSystemStmt(_) => Analysis::new("ALTER SYSTEM", ClassSet::ADMIN),
        N::VacuumStmt(vacuum) => Analysis::new(
            if vacuum.is_vacuumcmd {
                "VACUUM"
            } else {
                "ANALYZE"
            },
            ClassSet::ADMIN,
        ),
        N::ClusterStmt(_) => Analysis::new("CLUSTER", ClassSet::ADMIN),
        N::ReindexStmt(_) => Analysis::new("REINDEX", ClassSet::ADMIN),
        N::CheckPointStmt(_) => Analysis::new("CHECKPOINT", ClassSet::ADMIN),
        N::CreatedbStmt(_) => Analysis::new("CREATE DATABASE", ClassSet::DDL | ClassSet::ADMIN),
        N::AlterDatabaseStmt(_)
        | N::AlterDatabaseRefreshCollStmt(_)
        | N::AlterDatabaseSetStmt(_) => {
            Analysis::new("ALTER DATABASE", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::DropdbStmt(_) => Analysis::new("DROP DATABASE", ClassSet::DDL | ClassSet::ADMIN),
        N::CreateTableSpaceStmt(_) => {
            Analysis::new("CREATE TABLESPACE", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::DropTableSpaceStmt(_) => {
            Analysis::new("DROP TABLESPACE", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::AlterTableSpaceOptionsStmt(_) => {
            Analysis::new("ALTER TABLESPACE", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::AlterTableMoveAllStmt(_) => {
            Analysis::new("ALTER TABLE", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::CreateFdwStmt(_) => Analysis::new(
            "CREATE FOREIGN DATA WRAPPER",
            ClassSet::DDL | ClassSet::ADMIN,
        ),
        N::AlterFdwStmt(_) => Analysis::new(
            "ALTER FOREIGN DATA WRAPPER",
            ClassSet::DDL | ClassSet::ADMIN,
        ),
        N::CreatePublicationStmt(_) => {
            Analysis::new("CREATE PUBLICATION", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::AlterPublicationStmt(_) => {
            Analysis::new("ALTER PUBLICATION", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::CreateSubscriptionStmt(_) => {
            Analysis::new("CREATE SUBSCRIPTION", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::AlterSubscriptionStmt(_) => {
            Analysis::new("ALTER SUBSCRIPTION", ClassSet::DDL | ClassSet::ADMIN)
        }
        N::DropSubscriptionStmt(_) => {
            Analysis::new("DROP SUBSCRIPTION", ClassSet::DDL | ClassSet::ADMIN)
        }

        // Privileges and roles.
        N::GrantStmt(grant) => Analysis::new(
            if grant.is_grant { "GRANT" } else { "REVOKE" },
            ClassSet::DCL,
        ),
        N::GrantRoleStmt(grant) => Analysis::new(
            if grant.is_grant { "GRANT" } else { "REVOKE" },
            ClassSet::DCL,
        ),
        N::AlterDefaultPrivilegesStmt(_) => {
            Analysis::new("ALTER DEFAULT PRIVILEGES", ClassSet::DCL)
        }
        N::CreateRoleStmt(role) => Analysis::new(
            match RoleStmtType::try_from(role.stmt_type) {
                Ok(RoleStmtType::RolestmtUser) => "CREATE USER",
                Ok(RoleStmtType::RolestmtGroup) => "CREATE GROUP",
                _ => "CREATE ROLE",
            },
            ClassSet::DCL,
        ),
        N::AlterRoleStmt(_) | N::AlterRoleSetStmt(_) => Analysis::new("ALTER ROLE", ClassSet::DCL),
        N::DropRoleStmt(_) => Analysis::new("DROP ROLE", ClassSet::DCL),
        N::DropOwnedStmt(_) => Analysis::new("DROP OWNED", ClassSet::DDL | ClassSet::DCL),
        N::ReassignOwnedStmt(_) => Analysis::new("REASSIGN OWNED", ClassSet::DDL | ClassSet::DCL),
        N::AlterOwnerStmt(owner) => Analysis::new(
            format!("ALTER {}", object_name(owner.object_type)),
            ClassSet::DDL | ClassSet::DCL,
        ),
        N::CreatePolicyStmt(_) => Analysis::new("CREATE POLICY", ClassSet::DDL | ClassSet::DCL),
        N::AlterPolicyStmt(_) => Analysis::new("ALTER POLICY", ClassSet::DDL | ClassSet::DCL),
        N::CreateUserMappingStmt(_) => {
            Analysis::new("CREATE USER MAPPING", ClassSet::DDL | ClassSet::DCL)
        }
        N::AlterUserMappingStmt(_) => {
            Analysis::new("ALTER USER MAPPING", ClassSet::DDL | ClassSet::DCL)
        }
        N::DropUserMappingStmt(_) => {
            Analysis::new("DROP USER MAPPING", ClassSet::DDL | ClassSet::DCL)
        }
        N::SecLabelStmt(_) => Analysis::new("SECURITY LABEL", ClassSet::DDL | ClassSet::DCL),

        // Schema changes.
        N::CreateStmt(_) => Analysis::new("CREATE TABLE", ClassSet::DDL),
        N::CreateForeignTableStmt(_) => Analysis::new("CREATE FOREIGN TABLE", ClassSet::DDL),
        N::CreateForeignServerStmt(_) => Analysis::new("CREATE SERVER", ClassSet::DDL),
        N::AlterForeignServerStmt(_) => Analysis::new("ALTER SERVER", ClassSet::DDL),
        N::ImportForeignSchemaStmt(_) => Analysis::new("IMPORT FOREIGN SCHEMA", ClassSet::DDL),
        N::IndexStmt(_) => Analysis::new("CREATE INDEX", ClassSet::DDL),
        N::CreateSeqStmt(_) => Analysis::new("CREATE SEQUENCE", ClassSet::DDL),
        N::AlterSeqStmt(_) => Analysis::new("ALTER SEQUENCE", ClassSet::DDL),
        N::ViewStmt(_) => Analysis::new("CREATE VIEW", ClassSet::DDL),
        N::CreateStatsStmt(_) => Analysis::new("CREATE STATISTICS", ClassSet::DDL),
        N::AlterStatsStmt(_) => Analysis::new("ALTER STATISTICS", ClassSet::DDL),
        N::CreateDomainStmt(_) => Analysis::new("CREATE DOMAIN", ClassSet::DDL),
        N::AlterDomainStmt(_) => Analysis::new("ALTER DOMAIN", ClassSet::DDL),
        N::CompositeTypeStmt(_) | N::CreateEnumStmt(_) | N::CreateRangeStmt(_) => {
            Analysis::new("CREATE TYPE", ClassSet::DDL)
        }
        N::AlterEnumStmt(_) | N::AlterTypeStmt(_) => Analysis::new("ALTER TYPE", ClassSet::DDL),
        N::AlterCollationStmt(_) => Analysis::new("ALTER COLLATION", ClassSet::DDL),
        N::AlterOperatorStmt(_) => Analysis::new("ALTER OPERATOR", ClassSet::DDL),
        N::CreateOpClassStmt(_) => Analysis::new("CREATE OPERATOR CLASS", ClassSet::DDL),
        N::CreateOpFamilyStmt(_) => Analysis::new("CREATE OPERATOR FAMILY", ClassSet::DDL),
        N::AlterOpFamilyStmt(_) => Analysis::new("ALTER OPERATOR FAMILY", ClassSet::DDL),
        N::AlterTsdictionaryStmt(_) => Analysis::new("ALTER TEXT SEARCH DICTIONARY", ClassSet::DDL),
        N::AlterTsconfigurationStmt(_) => {
            Analysis::new("ALTER TEXT SEARCH CONFIGURATION", ClassSet::DDL)
        }
        N::CreateCastStmt(_) => Analysis::new("CREATE CAST", ClassSet::DDL),
        N::CreateTransformStmt(_) => Analysis::new("CREATE TRANSFORM", ClassSet::DDL),
        N::CreateConversionStmt(_) => Analysis::new("CREATE CONVERSION", ClassSet::DDL),
        N::DefineStmt(define) => Analysis::new(
            format!("CREATE {}", object_name(define.kind)),
            ClassSet::DDL,
        ),
        N::CommentStmt(_) => Analysis::new("COMMENT", ClassSet::DDL),
        N::AlterObjectSchemaStmt(alter) => Analysis::new(
            format!("ALTER {}", object_name(alter.object_type)),
            ClassSet::DDL,
        ),
        N::AlterObjectDependsStmt(alter) => Analysis::new(
            format!("ALTER {}", object_name(alter.object_type)),
            ClassSet::DDL,
        ),
        N::RenameStmt(rename) => {
            if rename.rename_type == ObjectType::ObjectRole as i32 {
                Analysis::new("ALTER ROLE", ClassSet::DCL)
            } else {
                Analysis::new(
                    format!("ALTER {}", object_name(rename.rename_type)),
                    ClassSet::DDL,
                )
            }
        }
        N::AlterTableStmt(alter) => alter_table(alter),
        N::DropStmt(drop) => drop_stmt(drop),

        // Anything else (including node types a later PostgreSQL adds): fail closed.
        _ => Analysis::unknown(),
    };
    walk(node, &mut analysis, true)?;
    Ok(analysis)
}

/// Whether an `EXPLAIN`'s options ask it to run the statement. `EXPLAIN ANALYZE x` and
/// `EXPLAIN (ANALYZE) x` carry `analyze` with no value; `(ANALYZE false)` and `(ANALYZE off)`
/// do not run it. A value not understood counts as running it.
fn explain_analyzes(options: &[protobuf::Node]) -> bool {
    options.iter().any(|option| {
        let Some(N::DefElem(def)) = option.node.as_ref() else {
            return false;
        };
        if !def.defname.eq_ignore_ascii_case("analyze") {
            return false;
        }
        match def.arg.as_deref().and_then(|arg| arg.node.as_ref()) {
            None => true,
            Some(N::Boolean(value)) => value.boolval,
            Some(N::Integer(value)) => value.ival != 0,
            Some(N::String(value)) => !matches!(
                value.sval.to_ascii_lowercase().as_str(),
                "false" | "off" | "no" | "0" | "f" | "n"
            ),
            Some(_) => true,
        }
    })
}

fn transaction_stmt(transaction: &protobuf::TransactionStmt) -> Analysis {
    use TransactionStmtKind as K;
    let (command, classes) = match TransactionStmtKind::try_from(transaction.kind) {
        Ok(K::TransStmtBegin) => ("BEGIN", ClassSet::EMPTY),
        Ok(K::TransStmtStart) => ("START TRANSACTION", ClassSet::EMPTY),
        Ok(K::TransStmtCommit) => ("COMMIT", ClassSet::EMPTY),
        Ok(K::TransStmtRollback) => ("ROLLBACK", ClassSet::EMPTY),
        Ok(K::TransStmtSavepoint) => ("SAVEPOINT", ClassSet::EMPTY),
        Ok(K::TransStmtRelease) => ("RELEASE", ClassSet::EMPTY),
        Ok(K::TransStmtRollbackTo) => ("ROLLBACK", ClassSet::EMPTY),
        // Two-phase commit outlives the session and can finish another session's work.
        Ok(K::TransStmtPrepare) => ("PREPARE TRANSACTION", ClassSet::ADMIN),
        Ok(K::TransStmtCommitPrepared) => ("COMMIT PREPARED", ClassSet::ADMIN),
        Ok(K::TransStmtRollbackPrepared) => ("ROLLBACK PREPARED", ClassSet::ADMIN),
        _ => return Analysis::unknown(),
    };
    Analysis::new(command, classes)
}

fn variable_set(set: &protobuf::VariableSetStmt) -> Analysis {
    use VariableSetKind as K;
    let kind = VariableSetKind::try_from(set.kind);
    let command = match kind {
        Ok(K::VarReset | K::VarResetAll) => "RESET",
        _ => "SET",
    };
    let classes = match kind {
        // RESET ALL leaves role and session_authorization alone (they are GUC_NO_RESET_ALL).
        Ok(K::VarResetAll) => ClassSet::EMPTY,
        // SET TRANSACTION …, SET SESSION CHARACTERISTICS …
        Ok(K::VarSetMulti) => ClassSet::EMPTY,
        Ok(K::VarSetValue) => {
            let value = set
                .args
                .first()
                .and_then(|arg| arg.node.as_ref())
                .and_then(constant_text);
            setting_risk(Some(&set.name), value.as_deref(), true)
        }
        _ => setting_risk(Some(&set.name), None, false),
    };
    Analysis::new(command, classes)
}

/// The text of a constant as `SET` and `set_config` receive it.
fn constant_text(node: &N) -> Option<String> {
    let N::AConst(constant) = node else {
        return None;
    };
    match constant.val.as_ref()? {
        protobuf::a_const::Val::Sval(value) => Some(value.sval.clone()),
        protobuf::a_const::Val::Ival(value) => Some(value.ival.to_string()),
        protobuf::a_const::Val::Boolval(value) => Some(value.boolval.to_string()),
        protobuf::a_const::Val::Fval(value) => Some(value.fval.clone()),
        protobuf::a_const::Val::Bsval(_) => None,
    }
}

/// The classes of changing setting `name` (`None`: not a constant) to `value` (`None`: not a
/// constant, or a reset to the default). `has_value` tells a reset apart from a value that
/// could not be read.
fn setting_risk(name: Option<&str>, value: Option<&str>, has_value: bool) -> ClassSet {
    let Some(name) = name else {
        return ClassSet::ADMIN;
    };
    let name = name.trim().to_ascii_lowercase();
    if IDENTITY_SETTINGS.contains(&name.as_str())
        || SUPERUSER_SETTINGS.contains(&name.as_str())
        || SUPERUSER_SETTING_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
    {
        return ClassSet::ADMIN;
    }
    // Settings that change how the server reads the SQL that follows: the classifier parses
    // with standard_conforming_strings on and UTF-8 text, and would read a different
    // statement than the server if either changed. Only a change to the safe value passes.
    let value = value.map(|value| value.trim().to_ascii_lowercase());
    let safe = match name.as_str() {
        "standard_conforming_strings" => {
            has_value
                && matches!(
                    value.as_deref(),
                    Some("on" | "true" | "yes" | "1" | "t" | "y")
                )
        }
        "client_encoding" => {
            has_value && matches!(value.as_deref(), Some("utf8" | "utf-8" | "unicode"))
        }
        _ => true,
    };
    if safe {
        ClassSet::EMPTY
    } else {
        ClassSet::ADMIN
    }
}

fn alter_table(alter: &protobuf::AlterTableStmt) -> Analysis {
    use protobuf::AlterTableType as T;
    let mut classes = ClassSet::DDL;
    for command in &alter.cmds {
        let Some(N::AlterTableCmd(command)) = command.node.as_ref() else {
            continue;
        };
        if matches!(
            T::try_from(command.subtype),
            Ok(T::AtChangeOwner
                | T::AtEnableRowSecurity
                | T::AtDisableRowSecurity
                | T::AtForceRowSecurity
                | T::AtNoForceRowSecurity)
        ) {
            classes.add(ClassSet::DCL);
        }
    }
    Analysis::new(format!("ALTER {}", object_name(alter.objtype)), classes)
}

fn drop_stmt(drop: &protobuf::DropStmt) -> Analysis {
    let object = ObjectType::try_from(drop.remove_type);
    let mut classes = ClassSet::DDL;
    if matches!(object, Ok(ObjectType::ObjectPolicy)) {
        classes.add(ClassSet::DCL);
    }
    let mut analysis = Analysis::new(format!("DROP {}", object_name(drop.remove_type)), classes);
    if matches!(
        object,
        Ok(ObjectType::ObjectTable
            | ObjectType::ObjectView
            | ObjectType::ObjectMatview
            | ObjectType::ObjectForeignTable
            | ObjectType::ObjectSequence)
    ) {
        for object in &drop.objects {
            let Some(N::List(list)) = object.node.as_ref() else {
                continue;
            };
            let parts: Vec<&str> = list
                .items
                .iter()
                .filter_map(|item| match item.node.as_ref() {
                    Some(N::String(part)) => Some(part.sval.as_str()),
                    _ => None,
                })
                .collect();
            if let Some(relname) = parts.last() {
                analysis.tables.push(TableRef {
                    location: -1,
                    name: parts.join("."),
                    relname: (*relname).to_owned(),
                    qualified: parts.len() > 1,
                    target: true,
                });
            }
        }
    }
    analysis
}

/// How an object type is written in a command tag (`DROP MATERIALIZED VIEW`, …).
fn object_name(object: i32) -> &'static str {
    use ObjectType as O;
    match ObjectType::try_from(object) {
        Ok(O::ObjectAccessMethod) => "ACCESS METHOD",
        Ok(O::ObjectAggregate) => "AGGREGATE",
        Ok(O::ObjectAmop) | Ok(O::ObjectOperator) => "OPERATOR",
        Ok(O::ObjectAmproc) | Ok(O::ObjectFunction) => "FUNCTION",
        Ok(O::ObjectAttribute) => "ATTRIBUTE",
        Ok(O::ObjectCast) => "CAST",
        Ok(O::ObjectColumn) => "COLUMN",
        Ok(O::ObjectCollation) => "COLLATION",
        Ok(O::ObjectConversion) => "CONVERSION",
        Ok(O::ObjectDatabase) => "DATABASE",
        Ok(O::ObjectDefault) => "DEFAULT",
        Ok(O::ObjectDefacl) => "DEFAULT PRIVILEGES",
        Ok(O::ObjectDomain) => "DOMAIN",
        Ok(O::ObjectDomconstraint) | Ok(O::ObjectTabconstraint) => "CONSTRAINT",
        Ok(O::ObjectEventTrigger) => "EVENT TRIGGER",
        Ok(O::ObjectExtension) => "EXTENSION",
        Ok(O::ObjectFdw) => "FOREIGN DATA WRAPPER",
        Ok(O::ObjectForeignServer) => "SERVER",
        Ok(O::ObjectForeignTable) => "FOREIGN TABLE",
        Ok(O::ObjectIndex) => "INDEX",
        Ok(O::ObjectLanguage) => "LANGUAGE",
        Ok(O::ObjectLargeobject) => "LARGE OBJECT",
        Ok(O::ObjectMatview) => "MATERIALIZED VIEW",
        Ok(O::ObjectOpclass) => "OPERATOR CLASS",
        Ok(O::ObjectOpfamily) => "OPERATOR FAMILY",
        Ok(O::ObjectParameterAcl) => "PARAMETER",
        Ok(O::ObjectPolicy) => "POLICY",
        Ok(O::ObjectProcedure) => "PROCEDURE",
        Ok(O::ObjectPublication)
        | Ok(O::ObjectPublicationNamespace)
        | Ok(O::ObjectPublicationRel) => "PUBLICATION",
        Ok(O::ObjectRole) => "ROLE",
        Ok(O::ObjectRoutine) => "ROUTINE",
        Ok(O::ObjectRule) => "RULE",
        Ok(O::ObjectSchema) => "SCHEMA",
        Ok(O::ObjectSequence) => "SEQUENCE",
        Ok(O::ObjectSubscription) => "SUBSCRIPTION",
        Ok(O::ObjectStatisticExt) => "STATISTICS",
        Ok(O::ObjectTable) => "TABLE",
        Ok(O::ObjectTablespace) => "TABLESPACE",
        Ok(O::ObjectTransform) => "TRANSFORM",
        Ok(O::ObjectTrigger) => "TRIGGER",
        Ok(O::ObjectTsconfiguration) => "TEXT SEARCH CONFIGURATION",
        Ok(O::ObjectTsdictionary) => "TEXT SEARCH DICTIONARY",
        Ok(O::ObjectTsparser) => "TEXT SEARCH PARSER",
        Ok(O::ObjectTstemplate) => "TEXT SEARCH TEMPLATE",
        Ok(O::ObjectType) => "TYPE",
        Ok(O::ObjectUserMapping) => "USER MAPPING",
        Ok(O::ObjectView) => "VIEW",
        Ok(O::Undefined) | Err(_) => "OBJECT",
    }
}

/// Walks the whole tree under `node`, adding what it finds to `analysis`. With `effects`
/// false (a plain `EXPLAIN`, which runs nothing) only the tables are collected.
fn walk(node: &N, analysis: &mut Analysis, effects: bool) -> Result<(), ClassifyError> {
    let value = serde_json::to_value(node).map_err(|error| ClassifyError::TooComplex {
        message: error.to_string(),
    })?;
    let mut walker = Walker { analysis, effects };
    walker.visit(&value);
    Ok(())
}

struct Walker<'a> {
    analysis: &'a mut Analysis,
    effects: bool,
}

impl Walker<'_> {
    fn effect(&mut self, classes: ClassSet) {
        if self.effects {
            self.analysis.classes.add(classes);
        }
    }

    fn visit(&mut self, value: &Value) {
        match value {
            Value::Array(items) => {
                for item in items {
                    self.visit(item);
                }
            }
            Value::Object(fields) => {
                // Some fields hold a RangeVar or FuncCall directly rather than as a tagged
                // Node (DeleteStmt.relation, CallStmt.funccall): recognize them by shape.
                if fields.contains_key("relname") && fields.contains_key("relpersistence") {
                    self.range_var(fields, false);
                }
                if fields.contains_key("funcname") && fields.contains_key("agg_star") {
                    self.func_call(fields);
                }
                for (key, child) in fields {
                    if let Value::Object(node) = child {
                        self.tagged(key, node);
                    }
                    self.visit(child);
                }
            }
            _ => {}
        }
    }

    /// A tagged node: `key` is the node type (serde writes the Node oneof as `{"Type": {…}}`;
    /// node types are CamelCase, struct fields snake_case, so they never collide).
    fn tagged(&mut self, key: &str, node: &Map<String, Value>) {
        match key {
            "InsertStmt" | "MergeStmt" => {
                self.effect(ClassSet::WRITE);
                self.target(node);
            }
            "UpdateStmt" | "DeleteStmt" => {
                self.effect(ClassSet::WRITE);
                if node.get("where_clause").is_none_or(is_constant_true) {
                    self.effect(ClassSet::WRITE_UNBOUNDED);
                }
                self.target(node);
            }
            "SelectStmt" => {
                if node.get("into_clause").is_some_and(|into| !into.is_null()) {
                    self.effect(ClassSet::DDL | ClassSet::WRITE);
                }
                if node
                    .get("locking_clause")
                    .and_then(Value::as_array)
                    .is_some_and(|locks| !locks.is_empty())
                {
                    self.analysis.note(crate::notes::LOCKS_ROWS);
                }
            }
            "ExecuteStmt" if self.effects => {
                if let Some(name) = node.get("name").and_then(Value::as_str)
                    && !self.analysis.executes.iter().any(|known| known == name)
                {
                    self.analysis.executes.push(name.to_owned());
                }
            }
            "CommonTableExpr" => {
                if let Some(name) = node.get("ctename").and_then(Value::as_str) {
                    self.analysis.ctes.insert(name.to_owned());
                }
            }
            // `x.f` is PostgreSQL's attribute notation for `f(x)`: check the last name.
            "ColumnRef" => {
                let names = string_list(node.get("fields"));
                if names.len() >= 2
                    && let Some(last) = names.last()
                {
                    self.function(last, &[]);
                }
            }
            "AIndirection" => {
                for name in string_list(node.get("indirection")) {
                    self.function(&name, &[]);
                }
            }
            _ => {}
        }
    }

    fn target(&mut self, node: &Map<String, Value>) {
        if let Some(Value::Object(relation)) = node.get("relation") {
            self.range_var(relation, true);
        }
    }

    fn range_var(&mut self, fields: &Map<String, Value>, target: bool) {
        let text = |key: &str| fields.get(key).and_then(Value::as_str).unwrap_or_default();
        let relname = text("relname");
        if relname.is_empty() {
            return;
        }
        let parts: Vec<&str> = [text("catalogname"), text("schemaname"), relname]
            .into_iter()
            .filter(|part| !part.is_empty())
            .collect();
        self.analysis.tables.push(TableRef {
            location: fields.get("location").and_then(Value::as_i64).unwrap_or(-1),
            name: parts.join("."),
            relname: relname.to_owned(),
            qualified: parts.len() > 1,
            target,
        });
    }

    fn func_call(&mut self, fields: &Map<String, Value>) {
        let names = string_list(fields.get("funcname"));
        let Some(name) = names.last() else {
            return;
        };
        let args: &[Value] = fields
            .get("args")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        self.function(name, args);
    }

    fn function(&mut self, name: &str, args: &[Value]) {
        let name = name.to_ascii_lowercase();
        let name = name.as_str();
        if ADMIN_FUNCTIONS.contains(&name)
            || ADMIN_FUNCTION_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
        {
            self.effect(ClassSet::ADMIN);
        } else if OPAQUE_FUNCTIONS.contains(&name) {
            self.effect(ClassSet::OPAQUE_CODE);
        } else if WRITE_FUNCTIONS.contains(&name) {
            self.effect(ClassSet::WRITE);
        } else if name == "set_config" {
            let setting = args.first().and_then(constant_string);
            let value = args.get(1).and_then(constant_string);
            let classes = match setting {
                Some(setting) => setting_risk(Some(&setting), value.as_deref(), true),
                None => setting_risk(None, None, true),
            };
            self.effect(classes);
        }
    }
}

/// The strings of a list of `String` nodes (a qualified name).
fn string_list(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.pointer("/node/String/sval").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The text of a constant argument (`'role'`, `'off'::text`), or `None` when the argument is
/// computed.
fn constant_string(value: &Value) -> Option<String> {
    let node = value.get("node")?;
    if let Some(cast) = node.get("TypeCast") {
        return cast.get("arg").and_then(constant_string);
    }
    let val = node.get("AConst")?.get("val")?;
    if let Some(text) = val.pointer("/Sval/sval").and_then(Value::as_str) {
        return Some(text.to_owned());
    }
    if let Some(number) = val.pointer("/Ival/ival").and_then(Value::as_i64) {
        return Some(number.to_string());
    }
    if let Some(flag) = val.pointer("/Boolval/boolval").and_then(Value::as_bool) {
        return Some(flag.to_string());
    }
    None
}

/// Whether a WHERE clause is true for every row: `WHERE true`, `WHERE 't'::bool`,
/// `WHERE 1 = 1`, or an OR with such a branch (an AND of only such terms). A `null` clause
/// (no WHERE at all) is handled by the caller.
fn is_constant_true(value: &Value) -> bool {
    if value.is_null() {
        return true;
    }
    let Some(node) = value.get("node") else {
        return false;
    };
    if let Some(flag) = node.pointer("/AConst/val/Boolval/boolval") {
        return flag.as_bool() == Some(true);
    }
    if let Some(cast) = node.get("TypeCast") {
        let type_name = string_list(cast.pointer("/type_name/names"));
        let is_bool = type_name
            .last()
            .is_some_and(|name| name == "bool" || name == "boolean");
        return is_bool
            && cast
                .get("arg")
                .and_then(constant_string)
                .is_some_and(|text| {
                    matches!(
                        text.trim().to_ascii_lowercase().as_str(),
                        "t" | "true" | "y" | "yes" | "on" | "1"
                    )
                });
    }
    if let Some(expr) = node.get("AExpr") {
        let is_equals = expr.get("kind").and_then(Value::as_i64) == Some(1)
            && string_list(expr.get("name"))
                .last()
                .is_some_and(|op| op == "=");
        let constant = |side: &str| expr.pointer(&format!("/{side}/node/AConst/val")).cloned();
        return is_equals && constant("lexpr").is_some_and(|left| Some(left) == constant("rexpr"));
    }
    if let Some(expr) = node.get("BoolExpr") {
        let args = expr.get("args").and_then(Value::as_array);
        return match (expr.get("boolop").and_then(Value::as_i64), args) {
            (Some(1), Some(args)) => !args.is_empty() && args.iter().all(is_constant_true),
            (Some(2), Some(args)) => args.iter().any(is_constant_true),
            _ => false,
        };
    }
    false
}

/// The query whose rows a `COPY … TO STDOUT` sends, so the proxy can learn where each column
/// comes from (and mask it by its source): the parenthesized query as written, or
/// `SELECT columns FROM table` for a table.
fn copy_source(copy: &pg_query::protobuf::CopyStmt, text: &str) -> Option<String> {
    if copy.query.is_some() {
        return crate::shape::parenthesized(text).map(str::to_owned);
    }
    let relation = copy.relation.as_ref()?;
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut table = String::new();
    if !relation.schemaname.is_empty() {
        table.push_str(&quote(&relation.schemaname));
        table.push('.');
    }
    table.push_str(&quote(&relation.relname));
    let columns: Vec<String> = copy
        .attlist
        .iter()
        .filter_map(|n| match n.node.as_ref() {
            Some(N::String(s)) => Some(quote(&s.sval)),
            _ => None,
        })
        .collect();
    let list = if columns.is_empty() {
        "*".to_owned()
    } else {
        columns.join(", ")
    };
    Some(format!("SELECT {list} FROM {table}"))
}
