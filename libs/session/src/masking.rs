//! The session policy's masking rules (proto `MaskingRule`, as authz ships them) turned into
//! the masking engine's own configuration.
//!
//! The conversion lives here rather than in `agentgate-masking` so that the engine stays free
//! of the gRPC types; every proxy builds its masker through [`masker_for`], so all four agree
//! on what a rule means.

use agentgate_masking::{
    ConfigError, DetectorKind, HashKey, Masker, MaskingConfig, RuleConfig, Selector, Strategy,
};
use agentgate_proto::authz::v1::masking_rule::Selector as ProtoSelector;
use agentgate_proto::authz::v1::{MaskingRule, MaskingStrategy};

/// Why a session's masking rules could not be applied. The session is refused: masking that
/// silently does less than the policy says is a leak.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskingPolicyError {
    /// A rule names no selector at all (a policy newer than this proxy, or a bug in authz).
    #[error("masking rule {0:?} has no selector")]
    NoSelector(String),
    /// A detector this proxy's masking engine does not know.
    #[error("masking rule {rule:?} names detector {detector:?}, which this proxy does not know")]
    UnknownDetector {
        /// The rule's name.
        rule: String,
        /// The detector name as the policy wrote it.
        detector: String,
    },
    /// The engine refused the configuration (duplicate names, bad selector, hash key).
    #[error(transparent)]
    Engine(#[from] ConfigError),
}

/// Converts proto masking rules to the engine's configuration, keeping their order (the first
/// rule that selects a value wins).
///
/// An unspecified strategy becomes [`Strategy::Redact`], the one that reveals nothing: a rule
/// that exists must mask, whatever else is wrong with it.
pub fn masking_config(rules: &[MaskingRule]) -> Result<MaskingConfig, MaskingPolicyError> {
    let mut out = Vec::with_capacity(rules.len());
    for rule in rules {
        let selector = match &rule.selector {
            None => return Err(MaskingPolicyError::NoSelector(rule.name.clone())),
            Some(ProtoSelector::Column(s)) => Selector::Column(s.clone()),
            Some(ProtoSelector::JsonPath(s)) => Selector::JsonPath(s.clone()),
            Some(ProtoSelector::Header(s)) => Selector::Header(s.clone()),
            Some(ProtoSelector::KubernetesField(s)) => Selector::KubernetesField(s.clone()),
            Some(ProtoSelector::Detector(name)) => {
                Selector::Detector(detector(name).ok_or_else(|| {
                    MaskingPolicyError::UnknownDetector {
                        rule: rule.name.clone(),
                        detector: name.clone(),
                    }
                })?)
            }
        };
        let strategy = match MaskingStrategy::try_from(rule.strategy) {
            Ok(MaskingStrategy::Partial) => Strategy::Partial,
            Ok(MaskingStrategy::KeyedHash) => Strategy::Hash,
            _ => Strategy::Redact,
        };
        out.push(RuleConfig {
            name: rule.name.clone(),
            selector,
            strategy,
        });
    }
    Ok(MaskingConfig { rules: out })
}

/// Builds the masker of one session from its policy's rules and the deployment's hash key.
pub fn masker_for(
    rules: &[MaskingRule],
    hash_key: Option<HashKey>,
) -> Result<Masker, MaskingPolicyError> {
    Ok(Masker::new(&masking_config(rules)?, hash_key)?)
}

fn detector(name: &str) -> Option<DetectorKind> {
    let name = name.trim();
    DetectorKind::ALL.into_iter().find(|k| k.name() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, selector: ProtoSelector, strategy: MaskingStrategy) -> MaskingRule {
        MaskingRule {
            name: name.into(),
            selector: Some(selector),
            strategy: strategy as i32,
        }
    }

    #[test]
    fn converts_every_selector_and_strategy_in_order() {
        let config = masking_config(&[
            rule(
                "email",
                ProtoSelector::Column("public.users.email".into()),
                MaskingStrategy::Partial,
            ),
            rule(
                "pw",
                ProtoSelector::JsonPath("**.password".into()),
                MaskingStrategy::Redact,
            ),
            rule(
                "key",
                ProtoSelector::Header("x-api-key".into()),
                MaskingStrategy::KeyedHash,
            ),
            rule(
                "secrets",
                ProtoSelector::KubernetesField("Secret.data".into()),
                MaskingStrategy::Unspecified,
            ),
            rule(
                "cards",
                ProtoSelector::Detector("payment_card".into()),
                MaskingStrategy::Partial,
            ),
        ])
        .expect("valid rules");
        let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["email", "pw", "key", "secrets", "cards"]);
        assert_eq!(config.rules[2].strategy, Strategy::Hash);
        assert_eq!(
            config.rules[3].strategy,
            Strategy::Redact,
            "unspecified redacts"
        );
        assert_eq!(
            config.rules[4].selector,
            Selector::Detector(DetectorKind::PaymentCard)
        );
    }

    #[test]
    fn unknown_detector_and_missing_hash_key_are_refused() {
        let unknown = masking_config(&[rule(
            "x",
            ProtoSelector::Detector("telepathy".into()),
            MaskingStrategy::Redact,
        )]);
        assert!(matches!(
            unknown,
            Err(MaskingPolicyError::UnknownDetector { .. })
        ));
        let hashed = masker_for(
            &[rule(
                "k",
                ProtoSelector::Header("x-key".into()),
                MaskingStrategy::KeyedHash,
            )],
            None,
        );
        assert!(matches!(
            hashed,
            Err(MaskingPolicyError::Engine(
                ConfigError::MissingHashKey { .. }
            ))
        ));
        let missing = masking_config(&[MaskingRule {
            name: "n".into(),
            selector: None,
            strategy: 1,
        }]);
        assert!(matches!(missing, Err(MaskingPolicyError::NoSelector(_))));
    }

    #[test]
    fn a_converted_masker_masks() {
        let masker = masker_for(
            &[rule(
                "emails",
                ProtoSelector::Detector("email".into()),
                MaskingStrategy::Redact,
            )],
            None,
        )
        .expect("valid");
        let mut report = agentgate_masking::MaskReport::new();
        let out = masker.mask_text("mail ann@example.com", &mut report);
        assert_eq!(out, format!("mail {}", agentgate_masking::REDACTED));
        assert_eq!(report.count("emails"), 1);
    }
}
