//! The routing table: ordered rules `pattern -> buses` and a default.

use super::*;

/// One rule of a [`RoutingTable`].
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) pattern: Pattern,
    pub(super) to: Arc<[Arc<str>]>,
}

/// The ordered routing table: the first matching rule wins, then the default.
///
/// Built validated: every bus it names exists, no rule names a bus twice, and no rule is
/// fully shadowed by an earlier one (such a rule could never apply).
#[derive(Debug, Clone)]
pub struct RoutingTable {
    pub(super) rules: Vec<Rule>,
    pub(super) default: Option<Arc<[Arc<str>]>>,
}

/// `"<source>: <key>"`, or just the key when the table did not come from a file.
pub(super) fn at(source: Option<&str>, key: &str) -> String {
    match source {
        Some(s) => format!("{s}: {key}"),
        None => key.to_string(),
    }
}

impl RoutingTable {
    /// The table a config describes.
    ///
    /// # Errors
    /// As [`RoutingTable::new`], naming the config's source file.
    pub fn from_config(config: &Config) -> Result<RoutingTable> {
        RoutingTable::new(
            &config.routes,
            config.default.as_deref(),
            config.buses.keys().map(String::as_str),
            Some(&config.source),
        )
    }

    /// Validates `routes` and `default` against the bus names `buses`.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidConfig`] naming `source` (when given) and the rule (`routes[i]`)
    /// or `default`: a rule or default naming no bus, an unknown bus or the same bus twice;
    /// a rule fully shadowed by an earlier rule (the message names the earlier rule).
    pub fn new<'a>(
        routes: &[RouteConfig],
        default: Option<&[String]>,
        buses: impl IntoIterator<Item = &'a str>,
        source: Option<&str>,
    ) -> Result<RoutingTable> {
        let mut known: Vec<&str> = buses.into_iter().collect();
        known.sort_unstable();
        known.dedup();
        let names = |key: &str, what: &str, to: &[String]| -> Result<Arc<[Arc<str>]>> {
            if to.is_empty() {
                return Err(Error::config(format!(
                    "{}: {what} names no bus",
                    at(source, key)
                )));
            }
            let mut out: Vec<Arc<str>> = Vec::with_capacity(to.len());
            for name in to {
                if known.binary_search(&name.as_str()).is_err() {
                    return Err(Error::config(format!(
                        "{}: {what} names unknown bus {name:?}; the buses are: {}",
                        at(source, key),
                        known.join(", ")
                    )));
                }
                if out.iter().any(|n| **n == **name) {
                    return Err(Error::config(format!(
                        "{}: {what} names bus {name:?} twice",
                        at(source, key)
                    )));
                }
                out.push(name.as_str().into());
            }
            Ok(out.into())
        };
        let mut rules: Vec<Rule> = Vec::with_capacity(routes.len());
        for (i, route) in routes.iter().enumerate() {
            let what = format!("the rule matching {:?}", route.pattern.as_str());
            let to = names(&format!("routes[{i}].to"), &what, &route.to)?;
            if let Some(j) = rules.iter().position(|r| r.pattern.covers(&route.pattern)) {
                return Err(Error::config(format!(
                    "{}: the rule matching {:?} is shadowed by routes[{j}] (match {:?}): every topic it matches is taken by routes[{j}] first, so it never applies; remove it or move it above routes[{j}]",
                    at(source, &format!("routes[{i}]")),
                    route.pattern.as_str(),
                    rules[j].pattern.as_str(),
                )));
            }
            rules.push(Rule {
                pattern: route.pattern.clone(),
                to,
            });
        }
        let default = default
            .map(|d| names("default.to", "the default", d))
            .transpose()?;
        Ok(RoutingTable { rules, default })
    }

    /// The bus names `topic` goes to (several for a mirror), scanning the rules in order.
    /// A [`Router`] caches this answer; see [`Router::route`].
    ///
    /// # Errors
    /// [`ErrorKind::NoRoute`] naming the topic when no rule matches and there is no default.
    pub fn lookup(&self, topic: &Topic) -> Result<&[Arc<str>]> {
        match self.choose(topic) {
            Some(i) if i < self.rules.len() => Ok(&self.rules[i].to),
            Some(_) => Ok(self.default.as_deref().unwrap_or_default()),
            None => Err(no_route(topic)),
        }
    }

    /// The index of the rule that takes `topic`, `rules.len()` for the default, `None` for
    /// no route.
    pub(super) fn choose(&self, topic: &Topic) -> Option<usize> {
        match self.rules.iter().position(|r| r.pattern.matches(topic)) {
            Some(i) => Some(i),
            None => self.default.as_ref().map(|_| self.rules.len()),
        }
    }

    /// The rules in order: pattern and bus names.
    pub fn rules(&self) -> impl Iterator<Item = (&Pattern, &[Arc<str>])> {
        self.rules.iter().map(|r| (&r.pattern, &*r.to))
    }

    /// The default bus names, if any.
    pub fn default_buses(&self) -> Option<&[Arc<str>]> {
        self.default.as_deref()
    }

    /// Every bus the table sends something to (rules and default), sorted, without repeats.
    pub fn used_buses(&self) -> Vec<Arc<str>> {
        let mut all: Vec<Arc<str>> = self
            .rules
            .iter()
            .flat_map(|r| r.to.iter())
            .chain(self.default.iter().flat_map(|d| d.iter()))
            .cloned()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The buses that may carry a topic matching `pattern`, in table order without repeats:
    /// where a subscription to `pattern` must listen.
    ///
    /// Exact for the common cases and otherwise a superset (never missing a bus): a rule is
    /// left out when no topic matches both it and `pattern`, or when one earlier rule takes
    /// every such topic; the rules after one that covers `pattern` and the default are left
    /// out. A rule whose share of `pattern` is covered only by several earlier rules together
    /// is kept; the router filters what such a bus delivers anyway.
    pub fn buses_for_pattern(&self, pattern: &Pattern) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        let mut add = |to: &[Arc<str>]| {
            for name in to {
                if !out.contains(name) {
                    out.push(name.clone());
                }
            }
        };
        for (i, rule) in self.rules.iter().enumerate() {
            let Some(common) = intersection(pattern, &rule.pattern) else {
                continue;
            };
            // An intersection too long to be a valid pattern is kept: over-subscribing is safe.
            let taken_earlier = common.is_some_and(|common| {
                self.rules[..i]
                    .iter()
                    .any(|earlier| earlier.pattern.covers(&common))
            });
            if taken_earlier {
                continue;
            }
            add(&rule.to);
            if rule.pattern.covers(pattern) {
                // Every topic of `pattern` stops at this rule: later rules and the default
                // never see one.
                return out;
            }
        }
        if let Some(default) = &self.default {
            add(default);
        }
        out
    }
}

impl fmt::Display for RoutingTable {
    /// One line per rule (`routes[0]  marketdata.>  -> marketdata`), then the default,
    /// in aligned columns.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = |i: usize| format!("routes[{i}]");
        let lw = (0..self.rules.len())
            .map(|i| label(i).len())
            .chain(["default".len()])
            .max()
            .unwrap_or(0);
        let pw = self
            .rules
            .iter()
            .map(|r| r.pattern.as_str().len())
            .max()
            .unwrap_or(0);
        for (i, r) in self.rules.iter().enumerate() {
            writeln!(
                f,
                "{:lw$}  {:pw$}  -> {}",
                label(i),
                r.pattern.as_str(),
                r.to.join(", ")
            )?;
        }
        match &self.default {
            Some(d) => writeln!(f, "{:lw$}  {:pw$}  -> {}", "default", "", d.join(", ")),
            None => writeln!(
                f,
                "{:lw$}  (none: a topic no rule matches is a NoRoute error)",
                "default"
            ),
        }
    }
}

pub(super) fn no_route(topic: &Topic) -> Error {
    Error::new(
        ErrorKind::NoRoute,
        format!(
            "no route for topic {:?}: no rule matches it and the routing table has no default bus",
            topic.as_str()
        ),
    )
}

/// The topics matching both `a` and `b`, as one pattern: `None` when they share no topic,
/// `Some(None)` when the intersection is too long to be a valid pattern.
pub(super) fn intersection(a: &Pattern, b: &Pattern) -> Option<Option<Pattern>> {
    fn go<'a>(
        a: &'a [PatternToken],
        b: &'a [PatternToken],
        out: &mut Vec<&'a PatternToken>,
    ) -> bool {
        match (a.first(), b.first()) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            // `>` takes one or more tokens, and a non-empty rest matches one or more tokens:
            // the rest of the other pattern is the intersection.
            (Some(PatternToken::Rest), Some(_)) => {
                out.extend(b);
                true
            }
            (Some(_), Some(PatternToken::Rest)) => {
                out.extend(a);
                true
            }
            (Some(x @ PatternToken::Literal(l)), Some(PatternToken::Literal(m))) => {
                l == m && {
                    out.push(x);
                    go(&a[1..], &b[1..], out)
                }
            }
            (Some(x @ PatternToken::Literal(_)), Some(_)) | (Some(_), Some(x)) => {
                out.push(x);
                go(&a[1..], &b[1..], out)
            }
        }
    }
    let mut tokens = Vec::new();
    if !go(a.tokens(), b.tokens(), &mut tokens) {
        return None;
    }
    let text = tokens
        .iter()
        .map(|t| match t {
            PatternToken::Literal(l) => &**l,
            PatternToken::One => "*",
            PatternToken::Rest => ">",
        })
        .collect::<Vec<_>>()
        .join(".");
    Some(Pattern::new(text).ok())
}
