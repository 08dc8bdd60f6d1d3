//! The SQL risk class names, exactly as the policy catalog (`agentgate_policy::RISK_CLASSES`)
//! spells them, and a small set type the classifier accumulates them in.

/// Reads table data: `SELECT`, `VALUES`, `TABLE`, `FETCH`, `DECLARE CURSOR`, `COPY … TO STDOUT`,
/// `EXPLAIN` (without `ANALYZE`).
pub const READ: &str = "sql.read";
/// Changes table data: `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `TRUNCATE`, `COPY … FROM STDIN`,
/// `CREATE TABLE AS`, `SELECT INTO`, `REFRESH MATERIALIZED VIEW`, `LOCK`, and writes hidden in a
/// CTE, behind `EXPLAIN ANALYZE` or `EXECUTE`.
pub const WRITE: &str = "sql.write";
/// A write with no row bound: `UPDATE`/`DELETE` without `WHERE` (or with a constant-true one)
/// and `TRUNCATE`. Always comes together with [`WRITE`], so a policy can hold only the
/// dangerous writes for approval.
pub const WRITE_UNBOUNDED: &str = "sql.write.unbounded";
/// Changes the schema: `CREATE`, `ALTER`, `DROP`, `COMMENT`, …
pub const DDL: &str = "sql.ddl";
/// Changes who may do what: `GRANT`, `REVOKE`, roles, default privileges, ownership,
/// row-level security policies, user mappings.
pub const DCL: &str = "sql.dcl";
/// Operates the server rather than the data: admin functions (`pg_terminate_backend`,
/// `pg_read_file`, `lo_import`, `dblink…`), `ALTER SYSTEM`, `VACUUM`, `CHECKPOINT`, server-side
/// `COPY` files and programs, switching the session's identity (`SET ROLE`,
/// `SET SESSION AUTHORIZATION`, `set_config('role', …)`), and every statement the classifier
/// does not know.
pub const ADMIN: &str = "sql.admin";
/// Runs code whose effect the SQL text does not show: `DO`, `CALL`, `CREATE FUNCTION`,
/// triggers, rules, `COPY … PROGRAM`, `LOAD`, extensions, SQL given as a string
/// (`query_to_xml`), and `EXECUTE` of a statement this session did not prepare.
pub const OPAQUE_CODE: &str = "sql.opaque_code";
/// Bulk data transfer with `COPY`, whichever direction; comes with [`READ`] or [`WRITE`].
pub const COPY: &str = "sql.copy";

/// Every class this crate can produce, in catalog order (the order [`crate::StatementClass::risk_classes`]
/// lists them in).
pub const ALL: [&str; 8] = [
    READ,
    WRITE,
    WRITE_UNBOUNDED,
    DDL,
    DCL,
    ADMIN,
    OPAQUE_CODE,
    COPY,
];

/// A set of risk classes as a bit set over [`ALL`]: unions are cheap and the order of the
/// listed names is always the catalog's, whatever the order the walk found them in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct ClassSet(u8);

impl ClassSet {
    pub(crate) const EMPTY: ClassSet = ClassSet(0);
    pub(crate) const READ: ClassSet = ClassSet(1 << 0);
    pub(crate) const WRITE: ClassSet = ClassSet(1 << 1);
    pub(crate) const WRITE_UNBOUNDED: ClassSet = ClassSet(1 << 2);
    pub(crate) const DDL: ClassSet = ClassSet(1 << 3);
    pub(crate) const DCL: ClassSet = ClassSet(1 << 4);
    pub(crate) const ADMIN: ClassSet = ClassSet(1 << 5);
    pub(crate) const OPAQUE_CODE: ClassSet = ClassSet(1 << 6);
    pub(crate) const COPY: ClassSet = ClassSet(1 << 7);

    pub(crate) fn add(&mut self, other: ClassSet) {
        self.0 |= other.0;
    }

    pub(crate) fn with(mut self, other: ClassSet) -> ClassSet {
        self.add(other);
        self
    }

    pub(crate) fn names(self) -> Vec<&'static str> {
        ALL.iter()
            .enumerate()
            .filter(|(bit, _)| self.0 & (1 << bit) != 0)
            .map(|(_, name)| *name)
            .collect()
    }

    pub(crate) fn from_names(names: &[&'static str]) -> ClassSet {
        let mut set = ClassSet::EMPTY;
        for name in names {
            if let Some(bit) = ALL.iter().position(|known| known == name) {
                set.0 |= 1 << bit;
            }
        }
        set
    }
}

impl std::ops::BitOr for ClassSet {
    type Output = ClassSet;

    fn bitor(self, rhs: ClassSet) -> ClassSet {
        self.with(rhs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_in_catalog_order() {
        let set = ClassSet::COPY | ClassSet::READ | ClassSet::ADMIN;
        assert_eq!(set.names(), vec![READ, ADMIN, COPY]);
        assert_eq!(ClassSet::from_names(&set.names()), set);
    }
}
