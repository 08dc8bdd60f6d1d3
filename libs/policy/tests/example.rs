use agentgate_policy::PolicyEngine;
#[test]
fn example_loads() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policy.example.cedar");
    match PolicyEngine::load(std::path::Path::new(path)) {
        Ok(e) => println!("{e:?}"),
        Err(e) => panic!("{e}"),
    }
}
