//! Compiled source selectors: columns, JSON paths, headers, Kubernetes fields.

use crate::ConfigError;

/// One segment of a compiled path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    /// A key, compared ASCII case-insensitively.
    Key(String),
    /// `*`: exactly one key.
    Any,
    /// `**`: zero or more keys.
    AnyDepth,
}

/// A compiled JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathSel {
    segs: Vec<Seg>,
}

impl PathSel {
    pub(crate) fn parse(rule: &str, path: &str) -> Result<PathSel, ConfigError> {
        let p = path.trim();
        let p = p
            .strip_prefix("$.")
            .or_else(|| p.strip_prefix('$'))
            .unwrap_or(p);
        if p.is_empty() {
            return Err(ConfigError::selector(rule, "empty JSON path"));
        }
        let mut segs = Vec::new();
        for s in p.split('.') {
            // Arrays are transparent; `items[*]`, `items[0]`, `items[]` are accepted for
            // readability and mean `items`.
            let (s, indexed) = match s.find('[') {
                Some(i) if s.ends_with(']') => (&s[..i], true),
                _ => (s, false),
            };
            segs.push(match s {
                "" if indexed => continue,
                "" => return Err(ConfigError::selector(rule, "empty segment in JSON path")),
                "*" => Seg::Any,
                "**" => Seg::AnyDepth,
                k => Seg::Key(k.to_owned()),
            });
        }
        if segs.is_empty() {
            return Err(ConfigError::selector(rule, "empty JSON path"));
        }
        Ok(PathSel { segs })
    }

    /// Does the path of keys `path` (array indices omitted) match? Wildcard matching with
    /// backtracking to the last `**` only: O(len(path) × len(pattern)), no recursion.
    pub(crate) fn matches<S: AsRef<str>>(&self, path: &[S]) -> bool {
        let pat = &self.segs;
        let (mut p, mut k) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while k < path.len() {
            match pat.get(p) {
                Some(Seg::AnyDepth) => {
                    star = Some((p, k));
                    p += 1;
                }
                Some(Seg::Any) => {
                    p += 1;
                    k += 1;
                }
                Some(Seg::Key(key)) if key.eq_ignore_ascii_case(path[k].as_ref()) => {
                    p += 1;
                    k += 1;
                }
                _ => match star {
                    Some((sp, sk)) => {
                        p = sp + 1;
                        k = sk + 1;
                        star = Some((sp, sk + 1));
                    }
                    None => return false,
                },
            }
        }
        pat[p..].iter().all(|s| *s == Seg::AnyDepth)
    }
}

/// A compiled `schema.table.column` selector; `None` segments are `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ColumnSel {
    parts: [Option<String>; 3],
}

impl ColumnSel {
    pub(crate) fn parse(rule: &str, s: &str) -> Result<ColumnSel, ConfigError> {
        let parts: Vec<&str> = s.trim().split('.').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(ConfigError::selector(
                rule,
                "a column is schema.table.column (use * for any, e.g. *.users.email)",
            ));
        }
        let seg = |p: &str| (p != "*").then(|| p.to_owned());
        Ok(ColumnSel {
            parts: [seg(parts[0]), seg(parts[1]), seg(parts[2])],
        })
    }

    pub(crate) fn matches(&self, schema: &str, table: &str, column: &str) -> bool {
        [schema, table, column]
            .iter()
            .zip(&self.parts)
            .all(|(v, p)| p.as_ref().is_none_or(|p| p.eq_ignore_ascii_case(v)))
    }
}

/// A compiled header selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderSel {
    name: String,
    prefix: bool,
}

impl HeaderSel {
    pub(crate) fn parse(rule: &str, s: &str) -> Result<HeaderSel, ConfigError> {
        let s = s.trim();
        let (name, prefix) = match s.strip_suffix('*') {
            Some(p) => (p, true),
            None => (s, false),
        };
        if name.is_empty() && !prefix {
            return Err(ConfigError::selector(rule, "empty header name"));
        }
        Ok(HeaderSel {
            name: name.to_ascii_lowercase(),
            prefix,
        })
    }

    pub(crate) fn matches(&self, header: &str) -> bool {
        if self.prefix {
            header.len() >= self.name.len()
                && header.as_bytes()[..self.name.len()].eq_ignore_ascii_case(self.name.as_bytes())
        } else {
            header.eq_ignore_ascii_case(&self.name)
        }
    }
}

/// A compiled `Kind.path` selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KubeSel {
    kind: Option<String>,
    pub(crate) path: PathSel,
}

impl KubeSel {
    pub(crate) fn parse(rule: &str, s: &str) -> Result<KubeSel, ConfigError> {
        let Some((kind, path)) = s.trim().split_once('.') else {
            return Err(ConfigError::selector(
                rule,
                "a Kubernetes field is Kind.path, e.g. Secret.data",
            ));
        };
        if kind.is_empty() {
            return Err(ConfigError::selector(
                rule,
                "empty Kubernetes kind (use * for any)",
            ));
        }
        Ok(KubeSel {
            kind: (kind != "*").then(|| kind.to_owned()),
            path: PathSel::parse(rule, path)?,
        })
    }

    pub(crate) fn kind_matches(&self, kind: &str) -> bool {
        self.kind
            .as_ref()
            .is_none_or(|k| k.eq_ignore_ascii_case(kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> PathSel {
        PathSel::parse("t", s).expect("valid path")
    }

    #[test]
    fn json_paths() {
        assert!(p("user.email").matches(&["user", "email"]));
        assert!(p("$.user.email").matches(&["user", "Email"]));
        assert!(!p("user.email").matches(&["user"]));
        assert!(!p("user.email").matches(&["user", "email", "x"]));
        assert!(p("*.email").matches(&["a", "email"]));
        assert!(!p("*.email").matches(&["email"]));
        assert!(p("**.password").matches(&["password"]));
        assert!(p("**.password").matches(&["a", "b", "password"]));
        assert!(!p("**.password").matches(&["a", "password", "b"]));
        assert!(p("a.**").matches(&["a"]));
        assert!(p("a.**.z").matches(&["a", "b", "c", "z"]));
        assert!(p("**.b.**.d").matches(&["x", "b", "y", "d"]));
        assert!(p("items[*].card").matches(&["items", "card"]));
        assert!(p("items.[*].card").matches(&["items", "card"]));
        assert!(p("$[*].card").matches(&["card"]));
        assert!(!p("**.b.**.d").matches(&["x", "y", "d"]));
        let long: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
        assert!(!p("**.a.**.b.**.c.**.d").matches(&long));
    }

    #[test]
    fn columns_and_headers() {
        let c = ColumnSel::parse("t", "*.users.email").expect("valid");
        assert!(c.matches("public", "Users", "email"));
        assert!(!c.matches("public", "users", "name"));
        assert!(ColumnSel::parse("t", "users.email").is_err());
        let h = HeaderSel::parse("t", "X-Api-Key").expect("valid");
        assert!(h.matches("x-api-key"));
        let h = HeaderSel::parse("t", "x-secret-*").expect("valid");
        assert!(h.matches("X-Secret-Token"));
        assert!(!h.matches("x-secre"));
    }
}
