//! Prints how agentgate classifies the SQL given as the first argument (or on stdin):
//! `cargo run -p agentgate-sql-classify --example classify -- "DELETE FROM t"`.

use std::io::Read;

fn main() {
    let sql = match std::env::args().nth(1) {
        Some(sql) => sql,
        None => {
            let mut sql = String::new();
            if let Err(error) = std::io::stdin().read_to_string(&mut sql) {
                eprintln!("reading stdin: {error}");
                std::process::exit(2);
            }
            sql
        }
    };
    match agentgate_sql_classify::classify(&sql) {
        Ok(classification) => {
            for statement in &classification.statements {
                println!(
                    "{:?} {} {:?} tables={:?} notes={:?}",
                    statement.span,
                    statement.command,
                    statement.risk_classes,
                    statement.tables,
                    statement.notes
                );
            }
            println!("query: {:?}", classification.risk_classes());
        }
        Err(error) => {
            println!(
                "error {} (position {:?}): {error}",
                error.sqlstate(),
                error.position()
            );
            std::process::exit(1);
        }
    }
}
