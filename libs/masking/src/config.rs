//! The policy-facing description of what to mask and how.
//!
//! Policy is data: authz ships a [`MaskingConfig`] with each session's policy and the proxy
//! builds a [`crate::Masker`] from it. The format is deliberately small: a list of named rules,
//! each with one selector and one strategy. In TOML:
//!
//! ```toml
//! [[rules]]
//! name = "customer-email"
//! selector = { column = "public.customers.email" }
//! strategy = "partial"
//!
//! [[rules]]
//! name = "cards"
//! selector = { detector = "payment_card" }
//! strategy = "partial"
//!
//! [[rules]]
//! name = "api-secrets"
//! selector = { header = "x-api-key" }
//! strategy = "hash"
//! ```

use serde::{Deserialize, Serialize};

/// The masking part of a session's policy: an ordered list of rules.
///
/// Order matters only when two rules select the same thing: the first one wins, so a policy
/// can put a specific rule (one column, hashed) before a broad one (all columns named `ssn`,
/// redacted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingConfig {
    /// The rules, first match wins. An empty list masks nothing.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
}

/// One masking rule: what it selects and what it does to it.
///
/// The `name` is what the audit record shows ("customer-email masked 3 values"), so it should
/// say what was protected, never contain the protected data itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Unique within the config; reported in [`crate::MaskReport`] counts.
    pub name: String,
    /// Where the rule applies: a data source (column, JSON path, header, Kubernetes field)
    /// or a content detector.
    pub selector: Selector,
    /// How the selected value is rewritten.
    pub strategy: Strategy,
}

/// What a rule selects.
///
/// Source selectors (column, JSON path, header, Kubernetes field) are precise: the proxy knows
/// where a value came from, and the whole value is masked whatever it contains. Detectors are
/// for everything whose source says nothing (computed columns, free text, terminal output):
/// they find secrets by their shape and, where the format has one, by their checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Selector {
    /// `schema.table.column`, for result columns whose origin the proxy resolved (pg-proxy
    /// uses the table OID and column number of RowDescription, so aliases do not hide a
    /// column). A segment may be `*`: `*.*.ssn` selects every column named `ssn`. Matching is
    /// ASCII case-insensitive: over-masking a quoted `"Email"` column is safer than leaking it.
    Column(String),
    /// A path into a JSON document, keys separated by `.`, with an optional leading `$.`:
    /// `user.email`, `items.*.card`, `**.password`. `*` matches any one key, `**` any number
    /// of keys (including none). Keys match ASCII case-insensitively. Arrays are transparent:
    /// `users.email` matches the `email` of every element of `users` (`users[*].email` is
    /// accepted and means the same). If the path selects an object or array, every string and
    /// number beneath it is masked.
    JsonPath(String),
    /// An HTTP header name, ASCII case-insensitive. A trailing `*` matches a prefix
    /// (`x-secret-*`).
    Header(String),
    /// A field of a Kubernetes object: `Kind.path`, where `path` is a JSON path as above and
    /// `Kind` is the object's `kind` (case-insensitive) or `*`. `Secret.data` masks every
    /// value of a Secret; `Pod.spec.containers.env.value` masks literal environment values.
    /// Values of `Secret.data` and `ConfigMap.binaryData` are base64: they are decoded,
    /// masked and re-encoded so that clients which decode them still work.
    KubernetesField(String),
    /// A content detector, applied to every value no source rule selected and to streams.
    Detector(DetectorKind),
}

/// How a selected value is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Replace the value with the fixed marker [`crate::REDACTED`]. Nothing about the value
    /// survives, not even its length.
    Redact,
    /// Keep the part that helps a reader and is not the secret: the domain of an email, the
    /// last four digits of a card, SSN or phone number, the country and last four characters
    /// of an IBAN, the network half of an IP address, the prefix of an API token (so the
    /// reader knows which kind of credential was there). Values with no known format keep
    /// their punctuation and at most their last four letters or digits: a quarter of them,
    /// and none of a value with fewer than eight.
    Partial,
    /// Replace the value with `[HMAC:<16 hex digits>]`, a truncated HMAC-SHA256 of the value
    /// under the deployment's secret ([`crate::HashKey`]). Equal values give equal tags, so an
    /// agent can still join, group and count; without the key the tag cannot be reversed or
    /// confirmed by guessing.
    Hash,
}

/// A content detector: a kind of secret or personal data recognised by its shape.
///
/// Detectors whose format carries a checksum (payment cards: Luhn; IBAN: ISO 7064 mod 97)
/// verify it, so that arbitrary digit strings are not masked. Token formats are recognised by
/// their documented prefix and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// `local@domain.tld` (ASCII; the domain needs a dot and an alphabetic TLD).
    Email,
    /// International numbers written with `+` (8 to 15 digits) and North American numbers
    /// written with separators: `(415) 555-2671`, `415-555-2671`, `1 415 555 2671`.
    Phone,
    /// US Social Security numbers `123-45-6789` (or space separated), excluding the ranges
    /// the SSA never issues (area 000, 666, 9xx; group 00; serial 0000).
    UsSsn,
    /// Payment card numbers of 12 to 19 digits, plain or grouped by spaces or dashes, with a
    /// known issuer prefix and a valid Luhn check digit.
    PaymentCard,
    /// International Bank Account Numbers, plain or grouped by spaces, with the length of
    /// their country and a valid mod-97 checksum.
    Iban,
    /// Dotted-quad IPv4 addresses (no leading zeros, not part of a longer dotted number).
    Ipv4,
    /// IPv6 addresses with at least two groups and one decimal digit (so `::` and C++ `a::b`
    /// are left alone).
    Ipv6,
    /// JSON Web Tokens (`eyJ…​.eyJ…​.sig`) whose header decodes to JSON with an `alg`.
    Jwt,
    /// PEM and OpenSSH private key blocks, and PGP private key blocks, from the BEGIN line
    /// through the END line.
    PrivateKey,
    /// AWS access key IDs (`AKIA`, `ASIA`, `ABIA`, `ACCA` + 16 characters).
    AwsAccessKey,
    /// AWS secret access keys, recognised by the name they are given
    /// (`aws_secret_access_key = …`, `"SecretAccessKey": "…"`); only the 40-character secret
    /// is masked.
    AwsSecretKey,
    /// GitHub tokens: `ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`.
    GithubToken,
    /// GitLab personal access tokens (`glpat-`).
    GitlabToken,
    /// Slack tokens (`xoxb-`, `xoxp-`, `xoxa-`, `xoxr-`, `xoxs-`, `xoxe-`, `xapp-`) and
    /// incoming-webhook URLs.
    SlackToken,
    /// Google API keys (`AIza` + 35 characters).
    GoogleApiKey,
    /// Stripe secret and restricted keys (`sk_live_`, `rk_live_`, `sk_test_`, `rk_test_`) and
    /// webhook secrets (`whsec_`).
    StripeKey,
    /// OpenAI API keys (`sk-proj-`, `sk-svcacct-`, `sk-admin-`, and legacy `sk-` + 48
    /// letters and digits).
    OpenaiApiKey,
    /// Anthropic API keys (`sk-ant-`).
    AnthropicApiKey,
    /// npm access tokens (`npm_` + 36 characters).
    NpmToken,
    /// PyPI upload tokens (`pypi-AgEIcHlwaS5vcmc…`).
    PypiToken,
    /// Hugging Face access tokens (`hf_` + 30 to 40 characters).
    HuggingfaceToken,
    /// SendGrid API keys (`SG.<22>.<43>`).
    SendgridKey,
    /// Azure storage account keys in connection strings (`AccountKey=…`); only the key is
    /// masked.
    AzureStorageKey,
    /// The password in a URL's user information (`postgres://app:s3cret@db/app`); only the
    /// password is masked.
    UrlCredentials,
}

impl DetectorKind {
    /// Every detector, in a stable order; used by [`MaskingConfig::recommended`] and tests.
    pub const ALL: [DetectorKind; 24] = [
        DetectorKind::Email,
        DetectorKind::Phone,
        DetectorKind::UsSsn,
        DetectorKind::PaymentCard,
        DetectorKind::Iban,
        DetectorKind::Ipv4,
        DetectorKind::Ipv6,
        DetectorKind::Jwt,
        DetectorKind::PrivateKey,
        DetectorKind::AwsAccessKey,
        DetectorKind::AwsSecretKey,
        DetectorKind::GithubToken,
        DetectorKind::GitlabToken,
        DetectorKind::SlackToken,
        DetectorKind::GoogleApiKey,
        DetectorKind::StripeKey,
        DetectorKind::OpenaiApiKey,
        DetectorKind::AnthropicApiKey,
        DetectorKind::NpmToken,
        DetectorKind::PypiToken,
        DetectorKind::HuggingfaceToken,
        DetectorKind::SendgridKey,
        DetectorKind::AzureStorageKey,
        DetectorKind::UrlCredentials,
    ];

    /// The snake_case name used in policy files, for messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            DetectorKind::Email => "email",
            DetectorKind::Phone => "phone",
            DetectorKind::UsSsn => "us_ssn",
            DetectorKind::PaymentCard => "payment_card",
            DetectorKind::Iban => "iban",
            DetectorKind::Ipv4 => "ipv4",
            DetectorKind::Ipv6 => "ipv6",
            DetectorKind::Jwt => "jwt",
            DetectorKind::PrivateKey => "private_key",
            DetectorKind::AwsAccessKey => "aws_access_key",
            DetectorKind::AwsSecretKey => "aws_secret_key",
            DetectorKind::GithubToken => "github_token",
            DetectorKind::GitlabToken => "gitlab_token",
            DetectorKind::SlackToken => "slack_token",
            DetectorKind::GoogleApiKey => "google_api_key",
            DetectorKind::StripeKey => "stripe_key",
            DetectorKind::OpenaiApiKey => "openai_api_key",
            DetectorKind::AnthropicApiKey => "anthropic_api_key",
            DetectorKind::NpmToken => "npm_token",
            DetectorKind::PypiToken => "pypi_token",
            DetectorKind::HuggingfaceToken => "huggingface_token",
            DetectorKind::SendgridKey => "sendgrid_key",
            DetectorKind::AzureStorageKey => "azure_storage_key",
            DetectorKind::UrlCredentials => "url_credentials",
        }
    }

    /// Index into per-detector tables.
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for DetectorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl MaskingConfig {
    /// A starting point for a deployment: every detector on, with the strategy that keeps
    /// output useful (partial for personal data, redact for credentials), plus the values of
    /// Kubernetes Secrets. Rules are named after their detector (`detector:email`, …) so that
    /// the audit record says what was found.
    pub fn recommended() -> Self {
        let mut rules = vec![
            RuleConfig {
                name: "kubernetes:secret-data".into(),
                selector: Selector::KubernetesField("Secret.data".into()),
                strategy: Strategy::Redact,
            },
            RuleConfig {
                name: "kubernetes:secret-string-data".into(),
                selector: Selector::KubernetesField("Secret.stringData".into()),
                strategy: Strategy::Redact,
            },
        ];
        for kind in DetectorKind::ALL {
            let strategy = match kind {
                DetectorKind::Email
                | DetectorKind::Phone
                | DetectorKind::UsSsn
                | DetectorKind::PaymentCard
                | DetectorKind::Iban
                | DetectorKind::Ipv4
                | DetectorKind::Ipv6
                | DetectorKind::PrivateKey => Strategy::Partial,
                _ => Strategy::Redact,
            };
            rules.push(RuleConfig {
                name: format!("detector:{}", kind.name()),
                selector: Selector::Detector(kind),
                strategy,
            });
        }
        MaskingConfig { rules }
    }
}
