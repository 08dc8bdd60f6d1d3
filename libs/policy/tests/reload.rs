//! Hot reload: a rewritten file becomes the policy in force without a restart; a broken one
//! is refused with its line and the old policy stays.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentgate_policy::PolicyStore;
use agentgate_proto::common::v1::{Principal, PrincipalKind};

const READ_AND_WRITE: &str = r#"
permit (principal in Agentgate::Group::"deployers", action == Agentgate::Action::"connect", resource)
when { ["read", "write"].contains(context.role) };
"#;

const READ_ONLY: &str = r#"
permit (principal in Agentgate::Group::"deployers", action == Agentgate::Action::"connect", resource)
when { context.role == "read" };
"#;

const BROKEN: &str = r#"
permit (principal in Agentgate::Group::"deployers", action == Agentgate::Action::"connect", resource)
when { context.role == "read" };

@approvals("two")
permit (principal, action == Agentgate::Action::"connect", resource);
"#;

fn deployer() -> Principal {
    Principal {
        subject: "agent:ci".into(),
        kind: PrincipalKind::Agent as i32,
        groups: vec!["deployers".into()],
        ..Default::default()
    }
}

fn write(path: &std::path::Path, text: &str) {
    if let Err(e) = std::fs::write(path, text) {
        panic!("write {}: {e}", path.display());
    }
}

fn open(path: &std::path::Path) -> PolicyStore {
    match PolicyStore::open(path) {
        Ok(store) => store,
        Err(e) => panic!("open: {e}"),
    }
}

#[test]
fn reload_swaps_in_a_new_file_and_keeps_the_old_on_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.cedar");
    write(&path, READ_AND_WRITE);
    let store = open(&path);
    let changes = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&changes);
    store.on_change(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let versions = store.subscribe();
    let first = store.current();
    assert!(first.standing_access(&deployer(), "prod-db", "write"));

    // unchanged file: no new version
    assert_eq!(store.reload(), Ok(false));

    // a role removed: new sessions see it at once
    write(&path, READ_ONLY);
    assert_eq!(store.reload(), Ok(true));
    let second = store.current();
    assert_ne!(second.version(), first.version());
    assert!(!second.standing_access(&deployer(), "prod-db", "write"));
    assert!(second.standing_access(&deployer(), "prod-db", "read"));
    assert_eq!(*versions.borrow(), second.version());
    assert_eq!(changes.load(Ordering::SeqCst), 1);
    // a snapshot taken before the reload is unchanged
    assert!(first.standing_access(&deployer(), "prod-db", "write"));

    // broken: refused with its line; the read-only policy stays
    write(&path, BROKEN);
    let e = match store.reload() {
        Ok(changed) => panic!("a broken file was accepted ({changed})"),
        Err(e) => e,
    };
    assert_eq!(e.line, 5, "{e}");
    assert!(e.to_string().contains("policy.cedar:5:1:"), "{e}");
    assert_eq!(store.current().version(), second.version());
    assert_eq!(*versions.borrow(), second.version());
    assert_eq!(changes.load(Ordering::SeqCst), 1);

    // deleted: refused too
    std::fs::remove_file(&path).expect("remove");
    assert!(store.reload().is_err());
    assert_eq!(store.current().version(), second.version());
}

#[test]
fn a_broken_file_is_refused_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.cedar");
    write(&path, BROKEN);
    match PolicyStore::open(&path) {
        Ok(_) => panic!("opened a broken policy"),
        Err(e) => assert_eq!(e.line, 5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_picks_up_changes_and_survives_broken_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.cedar");
    write(&path, READ_AND_WRITE);
    let store = Arc::new(open(&path));
    let mut versions = store.subscribe();
    let first = store.current().version().to_owned();
    let watcher = store.spawn_watcher(Duration::from_millis(20));

    write(&path, BROKEN);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        store.current().version(),
        first,
        "broken file must not replace the policy"
    );

    write(&path, READ_ONLY);
    tokio::time::timeout(Duration::from_secs(5), versions.changed())
        .await
        .expect("the watcher noticed the change in time")
        .expect("store alive");
    let now = versions.borrow_and_update().clone();
    assert_ne!(now, first);
    assert_eq!(store.current().version(), now);
    assert!(
        !store
            .current()
            .standing_access(&deployer(), "prod-db", "write")
    );

    // Dropping the store ends the watcher.
    drop(store);
    tokio::time::timeout(Duration::from_secs(5), watcher)
        .await
        .expect("watcher ends once the store is gone")
        .expect("watcher did not panic");
}
