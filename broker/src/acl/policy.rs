//! The ACL policy: data (TOML), deny by default, publish and subscribe rules per role with an
//! `{id}` placeholder. Decisions are pure functions of (identity, topic).
//!
//! ```toml
//! [device]
//! publish = ["devices/{id}/status", ...]
//! subscribe = ["devices/{id}/cmd", ...]
//! [service]
//! ...
//! ```
//!
//! * A PUBLISH (and a will, and a retained publish) is allowed if a publish rule matches its
//!   topic name.
//! * A SUBSCRIBE filter is allowed only if it lies within one subscribe rule: every topic the
//!   filter can match is matched by that rule ([`super::filter::within`]). So `devices/+/cmd`
//!   is never granted by `devices/{id}/cmd`, and `#` never by anything but `#`.
//! * `{id}` must be a whole level; it is replaced by the identity's id, which the certificate
//!   layer has already checked to be free of `/ + # $`, so it always stays one literal level.
//! * Topics and filters starting with `$` are denied to every role whose rules do not name a
//!   `$` level literally (the default policy names none).
//! * A role absent from the file has no rights.

use std::collections::BTreeMap;

use fleet_certs::{Identity, Role};
use serde::Deserialize;

use super::filter::{self, check_filter, check_name, TopicSyntax};

/// The placeholder replaced by the identity's id.
pub(crate) const ID_PLACEHOLDER: &str = "{id}";

/// The default policy, following the topic table: devices publish their reports and read
/// their commands and update stream; services command and update any device and read all
/// device reports and the fleet API; gateway certificates (bridges) get nothing here.
pub(crate) const DEFAULT_POLICY: &str = include_str!("default_policy.toml");

/// Rules of one role.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleRules {
    /// Topic filters the role may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic filters the role's subscriptions must lie within.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// Why a policy file is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Not TOML of the expected shape.
    #[error("policy is not valid: {0}")]
    Parse(#[from] toml::de::Error),
    /// A rule is not a valid filter.
    #[error("rule {rule:?} of role {role}: {problem}")]
    Rule {
        /// The role.
        role: String,
        /// The rule as written.
        rule: String,
        /// What is wrong.
        problem: String,
    },
}

/// A loaded, validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Policy {
    roles: BTreeMap<Role, RoleRules>,
}

/// What an ACL check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Allowed.
    Allow,
    /// Denied, with the reason (for the log line).
    Deny(DenyReason),
}

/// Why a request was denied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum DenyReason {
    /// The topic or filter is not valid MQTT.
    #[error("invalid topic: {0}")]
    Syntax(TopicSyntax),
    /// No rule of the role allows it.
    #[error("no {0} rule allows it")]
    NoRule(&'static str),
}

impl Policy {
    /// Parses and validates a TOML policy.
    pub(crate) fn from_toml(text: &str) -> Result<Self, PolicyError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            device: Option<RoleRules>,
            #[serde(default)]
            service: Option<RoleRules>,
            #[serde(default)]
            gateway: Option<RoleRules>,
        }
        let file: File = toml::from_str(text)?;
        let mut roles = BTreeMap::new();
        for (role, rules) in [
            (Role::Device, file.device),
            (Role::Service, file.service),
            (Role::Gateway, file.gateway),
        ] {
            let rules = rules.unwrap_or_default();
            for rule in rules.publish.iter().chain(&rules.subscribe) {
                validate_rule(rule).map_err(|problem| PolicyError::Rule {
                    role: role.to_string(),
                    rule: rule.clone(),
                    problem,
                })?;
            }
            roles.insert(role, rules);
        }
        Ok(Self { roles })
    }

    /// The built-in default policy.
    pub(crate) fn default_policy() -> Self {
        // The default policy is a constant checked by the unit tests below; parsing it cannot
        // fail at run time, and an empty policy (deny all) would be the safe fallback anyway.
        Self::from_toml(DEFAULT_POLICY).unwrap_or(Self {
            roles: BTreeMap::new(),
        })
    }

    /// May `who` publish to `topic` (also used for wills and retained messages)? (The tests'
    /// form; the gateway asks through [`Policy::check_publish_as`].)
    #[cfg(test)]
    pub(crate) fn check_publish(&self, who: &Identity, topic: &str) -> Decision {
        self.check_publish_as(who.role, &who.id, topic)
    }

    /// [`Policy::check_publish`] for the holder of `role` and `id`.
    pub(crate) fn check_publish_as(&self, role: Role, id: &str, topic: &str) -> Decision {
        if let Err(e) = check_name(topic) {
            return Decision::Deny(DenyReason::Syntax(e));
        }
        let allowed = self.roles.get(&role).is_some_and(|r| {
            r.publish
                .iter()
                .any(|rule| filter::matches(&instantiate(rule, id), topic))
        });
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny(DenyReason::NoRule("publish"))
        }
    }

    /// May `who` subscribe to `filter`?
    pub(crate) fn check_subscribe(&self, who: &Identity, topic_filter: &str) -> Decision {
        self.check_subscribe_as(who.role, &who.id, topic_filter)
    }

    /// [`Policy::check_subscribe`] for the holder of `role` and `id`.
    pub(crate) fn check_subscribe_as(&self, role: Role, id: &str, topic_filter: &str) -> Decision {
        if let Err(e) = check_filter(topic_filter) {
            return Decision::Deny(DenyReason::Syntax(e));
        }
        let allowed = self.roles.get(&role).is_some_and(|r| {
            r.subscribe
                .iter()
                .any(|rule| filter::within(topic_filter, &instantiate(rule, id)))
        });
        if allowed {
            Decision::Allow
        } else {
            Decision::Deny(DenyReason::NoRule("subscribe"))
        }
    }
}

fn instantiate(rule: &str, id: &str) -> String {
    rule.replace(ID_PLACEHOLDER, id)
}

fn validate_rule(rule: &str) -> Result<(), String> {
    for level in rule.split('/') {
        if level.contains(ID_PLACEHOLDER) && level != ID_PLACEHOLDER {
            return Err("{id} must be a whole topic level".into());
        }
        if level.contains(['{', '}']) && level != ID_PLACEHOLDER {
            return Err("the only placeholder is {id}".into());
        }
    }
    check_filter(&instantiate(rule, "x")).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn who(role: Role, id: &str) -> Identity {
        Identity::new(role, id).unwrap_or_else(|e| panic!("{e}"))
    }

    fn policy() -> Policy {
        Policy::from_toml(DEFAULT_POLICY).unwrap_or_else(|e| panic!("default policy: {e}"))
    }

    #[test]
    fn roots_reach_every_device_and_reports_every_service() {
        let p = policy();
        let d = who(Role::Device, "dev-1");
        let s = who(Role::Service, "svc-1");
        assert_eq!(p.check_subscribe(&d, "fleet/trust/roots"), Decision::Allow);
        // Only the gateway's own service distributes roots.
        assert_ne!(p.check_publish(&d, "fleet/trust/roots"), Decision::Allow);
        assert_ne!(p.check_publish(&s, "fleet/trust/roots"), Decision::Allow);
        assert_ne!(p.check_subscribe(&d, "fleet/trust/#"), Decision::Allow);
        assert_eq!(p.check_subscribe(&s, "devices/+/trust"), Decision::Allow);
        assert_ne!(p.check_publish(&s, "devices/dev-1/trust"), Decision::Allow);
    }

    #[test]
    fn default_policy_follows_the_topic_table() {
        let p = policy();
        let d = who(Role::Device, "dev-1");
        for t in [
            "cmd/result",
            "status",
            "presence",
            "update/get",
            "update/progress",
            "trust",
        ] {
            assert_eq!(
                p.check_publish(&d, &format!("devices/dev-1/{t}")),
                Decision::Allow,
                "{t}"
            );
            assert_ne!(
                p.check_publish(&d, &format!("devices/dev-2/{t}")),
                Decision::Allow,
                "{t}"
            );
        }
        for t in ["cmd", "update/manifest", "update/chunk"] {
            assert_ne!(
                p.check_publish(&d, &format!("devices/dev-1/{t}")),
                Decision::Allow,
                "{t}"
            );
            assert_eq!(
                p.check_subscribe(&d, &format!("devices/dev-1/{t}")),
                Decision::Allow,
                "{t}"
            );
            assert_ne!(
                p.check_subscribe(&d, &format!("devices/dev-2/{t}")),
                Decision::Allow,
                "{t}"
            );
        }
        for f in [
            "devices/dev-2/#",
            "devices/+/cmd",
            "+/+/cmd",
            "#",
            "$SYS/#",
            "devices/dev-1/#",
            "devices/#",
            "+/dev-1/cmd",
        ] {
            assert_ne!(p.check_subscribe(&d, f), Decision::Allow, "{f}");
        }
        assert_ne!(p.check_publish(&d, "$SYS/x"), Decision::Allow);
        assert_ne!(p.check_publish(&d, "fleet/commands"), Decision::Allow);

        let s = who(Role::Service, "svc-1");
        assert_eq!(p.check_publish(&s, "devices/dev-1/cmd"), Decision::Allow);
        assert_eq!(
            p.check_publish(&s, "devices/dev-9/update/manifest"),
            Decision::Allow
        );
        assert_ne!(p.check_publish(&s, "devices/dev-1/status"), Decision::Allow);
        assert_eq!(p.check_subscribe(&s, "devices/+/status"), Decision::Allow);
        assert_eq!(
            p.check_subscribe(&s, "devices/dev-3/cmd/result"),
            Decision::Allow
        );
        assert_ne!(p.check_subscribe(&s, "devices/#"), Decision::Allow);
        assert_ne!(p.check_subscribe(&s, "#"), Decision::Allow);
        // The fleet API: requests only as itself, only its own responses, every event.
        assert_eq!(
            p.check_publish(&s, "fleet/api/svc-1/request"),
            Decision::Allow
        );
        assert_ne!(
            p.check_publish(&s, "fleet/api/svc-2/request"),
            Decision::Allow
        );
        assert_ne!(
            p.check_publish(&s, "fleet/api/svc-1/response"),
            Decision::Allow
        );
        assert_ne!(
            p.check_publish(&s, "fleet/events/commands/dev-1"),
            Decision::Allow
        );
        assert_eq!(
            p.check_subscribe(&s, "fleet/api/svc-1/response"),
            Decision::Allow
        );
        assert_ne!(
            p.check_subscribe(&s, "fleet/api/+/response"),
            Decision::Allow
        );
        assert_ne!(p.check_subscribe(&s, "fleet/#"), Decision::Allow);
        assert_eq!(p.check_subscribe(&s, "fleet/events/#"), Decision::Allow);

        let g = who(Role::Gateway, "gw-1");
        assert_ne!(p.check_publish(&g, "devices/dev-1/cmd"), Decision::Allow);
        assert_ne!(p.check_subscribe(&g, "devices/+/status"), Decision::Allow);
    }

    #[test]
    fn invalid_topics_are_denied_with_their_reason() {
        let p = policy();
        let d = who(Role::Device, "dev-1");
        assert_eq!(
            p.check_publish(&d, "devices/dev-1/+"),
            Decision::Deny(DenyReason::Syntax(TopicSyntax::WildcardInName))
        );
        assert_eq!(
            p.check_publish(&d, ""),
            Decision::Deny(DenyReason::Syntax(TopicSyntax::Empty))
        );
        assert_eq!(
            p.check_publish(&d, "devices/dev-1/status\0"),
            Decision::Deny(DenyReason::Syntax(TopicSyntax::Nul))
        );
        assert_eq!(
            p.check_subscribe(&d, "devices/dev-1/#/x"),
            Decision::Deny(DenyReason::Syntax(TopicSyntax::MisplacedWildcard))
        );
    }

    #[test]
    fn bad_policies_are_refused() {
        for bad in [
            "[device]\npublish = [\"devices/x{id}/a\"]",
            "[device]\npublish = [\"devices/{other}/a\"]",
            "[device]\nsubscribe = [\"a/#/b\"]",
            "[device]\nsubscribe = [\"\"]",
            "[robot]\npublish = []",
            "[device]\npublsh = []",
            "not toml [",
        ] {
            assert!(Policy::from_toml(bad).is_err(), "{bad}");
        }
        // An empty policy is valid and denies everything.
        let empty = Policy::from_toml("").unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(
            empty.check_publish(&who(Role::Device, "d"), "devices/d/status"),
            Decision::Allow
        );
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("devices".to_owned()),
            Just("dev-1".to_owned()),
            Just("dev-2".to_owned()),
            Just("cmd".to_owned()),
            Just("result".to_owned()),
            Just("status".to_owned()),
            Just("update".to_owned()),
            Just("chunk".to_owned()),
            Just("manifest".to_owned()),
            Just("fleet".to_owned()),
            Just("$SYS".to_owned()),
            Just(String::new()),
            Just("+".to_owned()),
            Just("#".to_owned()),
            "[a-z0-9$-]{1,4}",
        ]
    }

    fn topic_from(levels: Vec<String>) -> String {
        levels.join("/")
    }

    /// Topic levels near a device's tree: its own id, a neighbour's, ids that share a prefix,
    /// the topic table's leaves and the wildcards.
    fn near_level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("dev-1".to_owned()),
            Just("dev-2".to_owned()),
            Just("dev-10".to_owned()),
            Just("cmd".to_owned()),
            Just("result".to_owned()),
            Just("status".to_owned()),
            Just("update".to_owned()),
            Just("manifest".to_owned()),
            Just("chunk".to_owned()),
            Just("presence".to_owned()),
            Just("get".to_owned()),
            Just("progress".to_owned()),
            Just("+".to_owned()),
            Just("#".to_owned()),
        ]
    }

    /// Filters and topics: the device's own table entries and wildcard variants of them,
    /// filters that reach into other trees, shapes like the table (`devices/<level>/...`), and
    /// anything built from `level()`.
    fn near_topic() -> impl Strategy<Value = String> {
        let own = prop::sample::select(vec![
            "cmd",
            "cmd/result",
            "status",
            "presence",
            "update/get",
            "update/progress",
            "update/manifest",
            "update/chunk",
            "update/+",
            "+",
            "#",
            "cmd/#",
            "+/+",
        ])
        .prop_map(|leaf| format!("devices/dev-1/{leaf}"));
        // Filters that reach into other devices' trees.
        let wide = prop::sample::select(vec![
            "#",
            "devices/#",
            "devices/+/cmd",
            "+/+/cmd",
            "devices/+/update/#",
            "+/dev-2/#",
            "devices/dev-2/+",
            "devices/+/+",
        ])
        .prop_map(str::to_owned);
        prop_oneof![
            2 => own,
            1 => wide,
            3 => prop::collection::vec(near_level(), 1..4)
                .prop_map(|rest| format!("devices/{}", rest.join("/"))),
            1 => prop::collection::vec(level(), 1..6).prop_map(topic_from),
        ]
    }

    /// No filter a device is granted can match a topic outside its own tree, and no topic
    /// outside its tree may be published to. The test counts how many cases reached each
    /// check (a filter that matches a foreign topic, a topic outside the tree) and how many
    /// were granted at all, and fails if any is too rare to mean something.
    #[test]
    fn device_grants_stay_in_its_tree() {
        use proptest::test_runner::{Config, TestRunner};
        use std::cell::Cell;
        let p = policy();
        let d = who(Role::Device, "dev-1");
        let in_tree = |topic: &str| topic.starts_with("devices/dev-1/");
        let (foreign_match, sub_granted, foreign_publish, pub_granted) = (
            Cell::new(0u32),
            Cell::new(0u32),
            Cell::new(0u32),
            Cell::new(0u32),
        );
        let mut runner = TestRunner::new(Config {
            cases: 4000,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&(near_topic(), near_topic()), |(filter_text, topic)| {
            let topic = topic.replace(['+', '#'], "x");
            let granted = p.check_subscribe(&d, &filter_text) == Decision::Allow;
            if granted {
                sub_granted.set(sub_granted.get() + 1);
            }
            if filter::matches(&filter_text, &topic) && !in_tree(&topic) {
                // The check: a filter that reaches outside the tree is never granted.
                foreign_match.set(foreign_match.get() + 1);
                prop_assert!(!granted, "{filter_text} granted and matches {topic}");
            }
            let may_publish = p.check_publish(&d, &topic) == Decision::Allow;
            if may_publish {
                pub_granted.set(pub_granted.get() + 1);
            }
            if !in_tree(&topic) {
                foreign_publish.set(foreign_publish.get() + 1);
                prop_assert!(!may_publish, "publish to {topic} granted");
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        for (what, n) in [
            ("filters matching a foreign topic", foreign_match.get()),
            ("subscriptions granted", sub_granted.get()),
            ("publishes outside the tree", foreign_publish.get()),
            ("publishes granted", pub_granted.get()),
        ] {
            assert!(n >= 100, "only {n} of 4000 cases were {what}");
        }
    }

    proptest! {
        /// `within` is sound: whenever it says inner lies within outer, every topic matched by
        /// inner is matched by outer.
        #[test]
        fn within_is_sound(
            inner in prop::collection::vec(level(), 1..5),
            outer in prop::collection::vec(level(), 1..5),
            t in prop::collection::vec(level(), 1..6),
        ) {
            let (inner, outer) = (topic_from(inner), topic_from(outer));
            let topic = topic_from(t).replace(['+', '#'], "x");
            if check_filter(&inner).is_ok() && check_filter(&outer).is_ok()
                && filter::within(&inner, &outer) && filter::matches(&inner, &topic) {
                prop_assert!(filter::matches(&outer, &topic), "{inner} within {outer}, but {topic}");
            }
        }
    }
}
