//! Targeting rules: JsonLogic with flagd's operations, compiled once and evaluated often.
//!
//! Compiling resolves `$ref`s, splits `var` paths, recognises which part of the data a path reads
//! (`$flagd`, `targetingKey` or the attributes), pre-parses `sem_ver` literals and prepares constant
//! `fractional` distributions, so evaluation parses nothing. JsonLogic semantics are
//! json-logic-js's (JavaScript coercion and truthiness); the flagd operations follow flagd's Go
//! evaluator, including its answer of null (so the default variant is served) to invalid input.

use std::rc::Rc;

use bunting_model::limits::MAX_RULE_DEPTH;
use indexmap::IndexMap;
use serde_json::Value;

use crate::budget::{Exhausted, Meter, Site, RULE_SITE};
use crate::compiled::{CompileOptions, FractionalBucketing};
use crate::context::{flagd_properties, EvaluationContext};
use crate::fractional::{self, Distribution};
use crate::semver::{version_text, OwnedVersion, Release, SemverOp, Version};
pub(crate) use crate::val::Val;
use crate::val::{canonical_index, lookup_json, str_eq, VALUE_BYTES};
use bunting_model::limits::BUDGET_BYTES_PER_STEP;

/// What one evaluation sees: the flag being evaluated and the caller's context.
#[derive(Clone, Copy)]
pub(crate) struct Env<'a> {
    pub(crate) flag_key: &'a str,
    pub(crate) ctx: &'a EvaluationContext,
}

impl<'a> Env<'a> {
    pub(crate) fn new(flag_key: &'a str, ctx: &'a EvaluationContext) -> Self {
        Env { flag_key, ctx }
    }
}

/// A compiled targeting rule.
#[derive(Debug)]
pub(crate) struct Rule {
    root: Tail,
    bucketing: FractionalBucketing,
    /// JSON Pointers (below the rule) of the operations that charge the evaluation budget.
    sites: Box<[Box<str>]>,
}

/// What a targeting result means for its flag.
#[derive(Debug)]
pub(crate) enum Outcome<'a> {
    /// The variant at this position of the flag's variants (as given to
    /// [`Rule::compile_for_flag`]).
    Variant(usize),
    /// Null: the default variant is served.
    Default,
    /// Any other result, for the flag to look up by name.
    Value(Val<'a>),
    /// The evaluation ran out of budget at the operation with this pointer (below the rule).
    Exhausted(Exhausted, &'a str),
}

/// The parts of a rule that produce its result, with the literals among them already matched to
/// the flag's variants, so evaluation ends in an index rather than a name to look up.
#[derive(Debug)]
enum Tail {
    /// A literal naming the variant at this position; the literal is kept for
    /// [`Rule::evaluate`].
    Variant(usize, #[cfg_attr(not(test), allow(dead_code))] Box<Value>),
    /// A literal null.
    Default,
    /// `if`/`?:`: each condition with what it leads to, then what holds when none does.
    If(Vec<(Cond, Tail)>, Box<Tail>),
    /// A `fractional` with a constant distribution, and what each of its variants leads to.
    Fractional(Box<FractionalNode>, Vec<Tail>),
    /// Anything else: evaluated as a value. (Boxed, as the large variants here are, so the
    /// enum stays small and its variants quick to tell apart.)
    Eval(Box<Node>),
}

impl Tail {
    /// The result part of `node`, matching literals against `variants`.
    fn new(node: Node, variants: &[&str]) -> Tail {
        match node {
            Node::Lit(v) => Tail::literal(v, variants),
            Node::If(args) => {
                let mut args = args.into_iter();
                let mut branches = Vec::new();
                loop {
                    match (args.next(), args.next()) {
                        (Some(cond), Some(then)) => {
                            branches.push((Cond::new(cond), Tail::new(then, variants)))
                        }
                        (Some(last), None) => {
                            break Tail::If(branches, Box::new(Tail::new(last, variants)))
                        }
                        _ => break Tail::If(branches, Box::new(Tail::Default)),
                    }
                }
            }
            Node::Fractional(f) => {
                let outcomes = match &f.constant {
                    Some(ConstantFractional {
                        distribution: Some(d),
                        ..
                    }) => d
                        .variants()
                        .iter()
                        .map(|v| Tail::literal(v.clone(), variants))
                        .collect(),
                    _ => return Tail::Eval(Box::new(Node::Fractional(f))),
                };
                Tail::Fractional(f, outcomes)
            }
            other => Tail::Eval(Box::new(other)),
        }
    }

    /// A literal result: the variant it names (as the flag would look its name up), the
    /// default for null, else left to be looked up (and reported) at evaluation.
    fn literal(v: Value, variants: &[&str]) -> Tail {
        let found = match Val::from_json(&v).variant_key() {
            None => return Tail::Default,
            Some(name) => variants.iter().position(|k| *k == name),
        };
        match found {
            Some(i) => Tail::Variant(i, Box::new(v)),
            None => Tail::Eval(Box::new(Node::Lit(v))),
        }
    }
}

/// One segment of a `var` path.
#[derive(Debug, Clone)]
struct Seg {
    key: Box<str>,
    /// The key as an array index, when it is a canonical one.
    index: Option<usize>,
}

/// Where a static `var` path starts in flagd's data object.
#[derive(Debug, Clone)]
enum Root {
    /// `$flagd.flagKey`.
    FlagKey,
    /// `$flagd.timestamp`.
    Timestamp,
    /// `$flagd` itself, or a member of it that flagd does not define.
    Flagd,
    /// `targetingKey`.
    TargetingKey,
    /// An attribute of the context.
    Attr,
}

#[derive(Debug, Clone)]
struct Path {
    segs: Vec<Seg>,
    root: Root,
}

impl Path {
    /// The attribute's name when the path is one attribute of the context, nothing below it.
    fn attribute_key(&self) -> Option<&str> {
        match (&self.root, &*self.segs) {
            (Root::Attr, [only]) => Some(&only.key),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    StrictEq,
    Ne,
    StrictNe,
    Not,
    NotNot,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Min,
    Max,
    In,
    Cat,
    Substr,
    Merge,
    Missing,
    MissingSome,
    StartsWith,
    EndsWith,
}

impl Op {
    /// The comparison with its operands in the other order when `var_first` is false, so that
    /// the variable comes first: `lit < var` is `var > lit`.
    fn with_var_first(self, var_first: bool) -> Op {
        match (self, var_first) {
            (op, true) => op,
            (Op::Lt, false) => Op::Gt,
            (Op::Le, false) => Op::Ge,
            (Op::Gt, false) => Op::Lt,
            (Op::Ge, false) => Op::Le,
            (op, false) => op,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Iter {
    Map,
    Filter,
    All,
    None,
    Some,
}

/// What an operation that charges the evaluation budget knows of itself.
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Where it is, for the error when the budget runs out.
    site: Site,
    /// How many nodes its second argument has: what one element costs an iterating operation.
    body: u32,
}

/// The operations whose cost grows with the data they are given; each charges the budget and
/// records its pointer.
const METERED: &[&str] = &[
    "merge",
    "cat",
    "substr",
    "in",
    "missing",
    "missing_some",
    "map",
    "filter",
    "reduce",
    "all",
    "none",
    "some",
];

#[derive(Debug)]
enum Node {
    /// A literal: scalars, and arrays and objects without logic inside.
    Lit(Value),
    /// An array with logic inside: evaluated element by element.
    Array(Vec<Node>),
    /// `var` with a path known at compile time.
    Var {
        path: Path,
        default: Option<Box<Node>>,
    },
    /// `var` whose path is computed.
    VarDyn(Vec<Node>),
    If(Vec<Node>),
    And(Vec<Node>),
    Or(Vec<Node>),
    /// An operation; the site names it in budget errors when it charges the budget.
    Op(Op, Site, Vec<Node>),
    /// A comparison of a `var` with a literal, the commonest condition: no argument list to walk.
    CmpVarLit(Box<CmpVarLit>),
    /// `in` with a literal list of strings: a set lookup instead of a walk over JSON.
    InStrings(Box<Node>, Box<StringSet>),
    Iter(Iter, Box<[Node; 2]>, Meta),
    Reduce(Box<[Node; 3]>, bool, Meta),
    Fractional(Box<FractionalNode>),
    SemVer(Box<SemVerNode>),
}

#[derive(Debug)]
struct CmpVarLit {
    op: Op,
    path: Path,
    lit: Value,
    /// Whether the `var` is the left operand.
    var_first: bool,
}

/// The strings of a literal `in` list; hashed when there are many.
#[derive(Debug)]
enum StringSet {
    /// Few strings, each short enough to pack into a word (see [`StringSet::pack`]): compared
    /// as integers. Country codes, plans, regions: the usual lists.
    Packed(Vec<u64>),
    Few(Vec<Box<str>>),
    Many(std::collections::HashSet<Box<str>, foldhash::fast::FixedState>),
}

impl StringSet {
    const SCAN_LIMIT: usize = 8;

    fn new(items: &[Value]) -> Option<StringSet> {
        let strings: Vec<Box<str>> = items
            .iter()
            .map(|v| v.as_str().map(Box::from))
            .collect::<Option<_>>()?;
        Some(if strings.len() <= Self::SCAN_LIMIT {
            match strings.iter().map(|s| Self::pack(s)).collect() {
                Some(words) => StringSet::Packed(words),
                None => StringSet::Few(strings),
            }
        } else {
            StringSet::Many(strings.into_iter().collect())
        })
    }

    /// A string of at most 7 bytes as one word: its bytes, and its length in the top byte (so
    /// strings that differ only in trailing NULs differ).
    #[inline]
    fn pack(s: &str) -> Option<u64> {
        let bytes = s.as_bytes();
        if bytes.len() > 7 {
            return None;
        }
        let word = bytes
            .iter()
            .enumerate()
            .fold(0u64, |w, (i, &b)| w | u64::from(b) << (8 * i));
        Some(word | (bytes.len() as u64) << 56)
    }

    #[inline]
    fn contains(&self, s: &str) -> bool {
        match self {
            // A longer string is in no packed set.
            StringSet::Packed(words) => Self::pack(s).is_some_and(|w| words.contains(&w)),
            other => other.contains_unpacked(s),
        }
    }

    /// [`StringSet::contains`] for the sets of longer strings, out of line.
    #[inline(never)]
    fn contains_unpacked(&self, s: &str) -> bool {
        match self {
            StringSet::Packed(_) => self.contains(s),
            StringSet::Few(v) => v.iter().any(|x| str_eq(x, s)),
            StringSet::Many(set) => set.contains(s),
        }
    }
}

#[derive(Debug)]
struct FractionalNode {
    args: Vec<Node>,
    /// The distribution, when every distribution argument is a literal (the usual case).
    constant: Option<ConstantFractional>,
}

#[derive(Debug)]
struct ConstantFractional {
    /// The expression giving the bucketing string, when the rule has one.
    bucket_by: Option<usize>,
    /// `None` when the literal distribution is invalid (the operation then answers null).
    distribution: Option<Distribution>,
}

#[derive(Debug)]
struct SemVerNode {
    args: Vec<Node>,
    /// Parsed when the operator and target version are literals: `None` inside when invalid.
    constant: Option<Option<(SemverOp, OwnedVersion)>>,
}

/// A condition of an `if` read at the top of the data, in the shapes targeting rules use most,
/// each with its operands prepared: an attribute compared with a literal, looked up in a literal
/// list, or compared as a version. Evaluates to the truthiness of the node it was made from.
#[derive(Debug)]
enum Cond {
    /// `and`, non-empty: every condition holds.
    All(Box<AllOf>),
    /// `or`: some condition holds.
    Any(Box<[Cond]>),
    /// `!` of its first argument.
    Not(Box<Cond>),
    /// `==`, `===`, `!=` or `!==` of an attribute and a string literal.
    AttrStrEq(Box<AttrCmp<Box<str>>>),
    /// An ordering comparison of an attribute with a string literal.
    AttrStr(Box<AttrCmp<Box<str>>>),
    /// A comparison of an attribute with a number literal.
    AttrNum(Box<AttrCmp<f64>>),
    /// `in` with an attribute and a literal list of strings.
    AttrIn(Box<str>, Box<StringSet>),
    /// `sem_ver` of an attribute with a literal operator and version.
    AttrSemVer(Box<(Box<str>, SemverOp, OwnedVersion)>),
    /// Anything else (boxed, so the common variants stay small and quick to tell apart).
    Node(Box<Node>),
}

#[derive(Debug)]
struct AttrCmp<L> {
    /// The attribute's name (a one-segment `var` path read at the top).
    key: Box<str>,
    /// The comparison with the attribute as its left operand (swapped at compile time when the
    /// rule has it on the right: JavaScript's `a < b` is `b > a`, coercions included).
    op: Op,
    lit: L,
}

/// The members of an `and`, grouped by kind. Each group is tested in a loop of its own, so the
/// members' kinds are not told apart one by one at a single jump, which the processor mispredicts
/// when kinds alternate. Members have no effects and always finish, so the order they are tested
/// in cannot change the result.
#[derive(Debug)]
struct AllOf {
    str_eq: Box<[AttrCmp<Box<str>>]>,
    num: Box<[AttrCmp<f64>]>,
    attr_in: Box<[(Box<str>, StringSet)]>,
    rest: Box<[Cond]>,
}

impl AllOf {
    fn new(members: impl Iterator<Item = Cond>) -> AllOf {
        let (mut str_eq, mut num, mut attr_in, mut rest) = (vec![], vec![], vec![], vec![]);
        for c in members {
            match c {
                Cond::AttrStrEq(c) => str_eq.push(*c),
                Cond::AttrNum(c) => num.push(*c),
                Cond::AttrIn(key, set) => attr_in.push((key, *set)),
                other => rest.push(other),
            }
        }
        AllOf {
            str_eq: str_eq.into(),
            num: num.into(),
            attr_in: attr_in.into(),
            rest: rest.into(),
        }
    }
}

impl Cond {
    fn new(node: Node) -> Cond {
        match node {
            Node::And(args) if !args.is_empty() => {
                Cond::All(Box::new(AllOf::new(args.into_iter().map(Cond::new))))
            }
            Node::Or(args) => Cond::Any(args.into_iter().map(Cond::new).collect()),
            Node::Op(Op::Not, _, args) if !args.is_empty() => match args.into_iter().next() {
                Some(first) => Cond::Not(Box::new(Cond::new(first))),
                None => Cond::Node(Box::new(Node::Lit(Value::Bool(true)))),
            },
            Node::CmpVarLit(c) => match (c.path.attribute_key(), &c.lit) {
                (Some(key), Value::String(lit)) => {
                    let cmp = Box::new(AttrCmp {
                        key: key.into(),
                        op: c.op.with_var_first(c.var_first),
                        lit: lit.as_str().into(),
                    });
                    match c.op {
                        Op::Eq | Op::StrictEq | Op::Ne | Op::StrictNe => Cond::AttrStrEq(cmp),
                        _ => Cond::AttrStr(cmp),
                    }
                }
                (Some(key), Value::Number(n)) => match n.as_f64() {
                    Some(lit) => Cond::AttrNum(Box::new(AttrCmp {
                        key: key.into(),
                        op: c.op.with_var_first(c.var_first),
                        lit,
                    })),
                    None => Cond::Node(Box::new(Node::CmpVarLit(c))),
                },
                _ => Cond::Node(Box::new(Node::CmpVarLit(c))),
            },
            Node::InStrings(needle, set) => match &*needle {
                Node::Var {
                    path,
                    default: None,
                } => match path.attribute_key() {
                    Some(key) => Cond::AttrIn(key.into(), set),
                    None => Cond::Node(Box::new(Node::InStrings(needle, set))),
                },
                _ => Cond::Node(Box::new(Node::InStrings(needle, set))),
            },
            Node::SemVer(sv) => match (&sv.constant, sv.args.first()) {
                (
                    Some(Some((op, target))),
                    Some(Node::Var {
                        path,
                        default: None,
                    }),
                ) if sv.args.len() == 3 => match path.attribute_key() {
                    Some(key) => Cond::AttrSemVer(Box::new((key.into(), *op, target.clone()))),
                    None => Cond::Node(Box::new(Node::SemVer(sv))),
                },
                _ => Cond::Node(Box::new(Node::SemVer(sv))),
            },
            other => Cond::Node(Box::new(other)),
        }
    }
}

impl Rule {
    /// Compiles a rule; `$ref`s are resolved against `evaluators`. Fails on what validation also
    /// refuses (unknown operators, unknown or cyclic `$ref`s, excessive depth).
    #[cfg(test)]
    pub(crate) fn compile(
        rule: &Value,
        evaluators: &IndexMap<String, Value>,
        options: &CompileOptions,
    ) -> Result<Rule, String> {
        Self::compile_for_flag(rule, evaluators, options, &[])
    }

    /// Compiles the targeting rule of a flag whose variant keys are `variants`, in order: results
    /// the rule gives as literals are matched to them now (see [`Rule::outcome`]).
    pub(crate) fn compile_for_flag(
        rule: &Value,
        evaluators: &IndexMap<String, Value>,
        options: &CompileOptions,
        variants: &[&str],
    ) -> Result<Rule, String> {
        let mut c = Compiler {
            evaluators,
            visiting: Vec::new(),
            nodes: 0,
            path: Vec::new(),
            sites: vec!["".into()],
        };
        let root = Tail::new(c.compile(rule, 0)?, variants);
        Ok(Rule {
            root,
            bucketing: options.fractional,
            sites: c.sites.into_boxed_slice(),
        })
    }

    fn site(&self, site: Site) -> &str {
        self.sites.get(site as usize).map_or("", |s| s)
    }

    /// Evaluates the rule against `env`, to the value it returns.
    #[cfg(test)]
    pub(crate) fn evaluate<'a>(&'a self, env: &Env<'a>) -> Val<'a> {
        let e = Eval {
            env: *env,
            bucketing: self.bucketing,
            meter: Meter::new(),
        };
        e.eval_tail(&self.root)
    }

    /// Evaluates the rule against `env`, as what its result means for the flag: the same answer
    /// as looking [`Rule::evaluate`]'s result up among the variants, found without the lookup
    /// where the rule names variants by literals.
    pub(crate) fn outcome<'a>(&'a self, env: &Env<'a>) -> Outcome<'a> {
        let e = Eval {
            env: *env,
            bucketing: self.bucketing,
            meter: Meter::new(),
        };
        let outcome = e.outcome(&self.root);
        match e.meter.exhausted() {
            None => outcome,
            Some((kind, site)) => Outcome::Exhausted(kind, self.site(site)),
        }
    }
}

/// Most nodes one rule may expand to. `$ref`s shared many times over can make a short document
/// expand exponentially; this bounds the memory and time one rule can cost. The same limit as
/// validation's, so a rule that validates also compiles.
pub(crate) const MAX_RULE_NODES: usize = bunting_model::limits::MAX_EXPANDED_RULE_NODES;

struct Compiler<'e> {
    evaluators: &'e IndexMap<String, Value>,
    visiting: Vec<String>,
    /// Nodes compiled so far, counted as validation counts them (every JSON value, argument
    /// lists included, `$ref` objects replaced by their targets).
    nodes: usize,
    /// JSON Pointer segments of the node being compiled, below the rule.
    path: Vec<String>,
    /// Pointers of the operations that charge the evaluation budget; 0 is the rule itself.
    sites: Vec<Box<str>>,
}

impl Compiler<'_> {
    fn count(&mut self) -> Result<(), String> {
        self.nodes += 1;
        if self.nodes > MAX_RULE_NODES {
            return Err(format!(
                "rule expands to more than {MAX_RULE_NODES} operations after $ref expansion"
            ));
        }
        Ok(())
    }

    /// Records the pointer of the operation being compiled, for errors about its budget.
    fn site(&mut self) -> Site {
        self.sites
            .push(bunting_model::pointer(self.path.iter()).into_boxed_str());
        Site::try_from(self.sites.len() - 1).unwrap_or(RULE_SITE)
    }

    fn compile_at(
        &mut self,
        segment: impl ToString,
        v: &Value,
        depth: usize,
    ) -> Result<Node, String> {
        self.path.push(segment.to_string());
        let node = self.compile(v, depth);
        self.path.pop();
        node
    }

    fn compile(&mut self, v: &Value, depth: usize) -> Result<Node, String> {
        if depth > MAX_RULE_DEPTH * 2 {
            return Err(format!(
                "rule nests deeper than the limit of {MAX_RULE_DEPTH}"
            ));
        }
        if let Value::Object(m) = v {
            if let (1, Some(name)) = (m.len(), m.get("$ref")) {
                self.path.push("$ref".into());
                let node = self.compile_ref(name, depth);
                self.path.pop();
                return node;
            }
        }
        self.count()?;
        match v {
            Value::Array(items) => {
                let nodes = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.compile_at(i, item, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                if nodes.iter().all(|n| matches!(n, Node::Lit(_))) {
                    Ok(Node::Lit(v.clone()))
                } else {
                    Ok(Node::Array(nodes))
                }
            }
            Value::Object(m) if m.len() == 1 => {
                let Some((op, args)) = m.iter().next() else {
                    return Ok(Node::Lit(v.clone()));
                };
                self.path.push(op.clone());
                let compiled = self.compile_args(args, depth);
                let node = compiled.and_then(|(args, body)| {
                    let site = if METERED.contains(&op.as_str()) {
                        self.site()
                    } else {
                        RULE_SITE
                    };
                    self.compile_op(op, args, Meta { site, body })
                });
                self.path.pop();
                node
            }
            // Objects with other than one key are data, not logic.
            _ => Ok(Node::Lit(v.clone())),
        }
    }

    /// An operation's arguments, and how many nodes its second one has (the body of an
    /// iterating operation, charged per element).
    fn compile_args(&mut self, args: &Value, depth: usize) -> Result<(Vec<Node>, u32), String> {
        let mut body = 0;
        // JsonLogic passes a lone non-array argument as a one-element list.
        let nodes = match args {
            Value::Array(items) => {
                self.count()?;
                let mut nodes = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let before = self.nodes;
                    nodes.push(self.compile_at(i, item, depth + 1)?);
                    if i == 1 {
                        body = u32::try_from(self.nodes - before).unwrap_or(u32::MAX);
                    }
                }
                nodes
            }
            other => vec![self.compile(other, depth + 1)?],
        };
        Ok((nodes, body))
    }

    fn compile_ref(&mut self, name: &Value, depth: usize) -> Result<Node, String> {
        let Some(name) = name.as_str() else {
            return Err("$ref must name an evaluator".into());
        };
        let Some(target) = self.evaluators.get(name) else {
            return Err(format!("$ref {name:?} names no entry of $evaluators"));
        };
        if self.visiting.iter().any(|v| v == name) {
            return Err(format!("$ref {name:?} refers back to itself"));
        }
        self.visiting.push(name.to_owned());
        let node = self.compile(target, depth);
        self.visiting.pop();
        node
    }

    fn compile_op(&mut self, op: &str, mut args: Vec<Node>, meta: Meta) -> Result<Node, String> {
        let simple = |o: Op, args: Vec<Node>| Ok(Node::Op(o, meta.site, args));
        match op {
            "var" => Ok(compile_var(args)),
            "if" | "?:" => Ok(Node::If(args)),
            "and" => Ok(Node::And(args)),
            "or" => Ok(Node::Or(args)),
            "==" => Ok(compile_compare(Op::Eq, args)),
            "===" => Ok(compile_compare(Op::StrictEq, args)),
            "!=" => Ok(compile_compare(Op::Ne, args)),
            "!==" => Ok(compile_compare(Op::StrictNe, args)),
            "!" => simple(Op::Not, args),
            "!!" => simple(Op::NotNot, args),
            "<" => Ok(compile_compare(Op::Lt, args)),
            "<=" => Ok(compile_compare(Op::Le, args)),
            ">" => Ok(compile_compare(Op::Gt, args)),
            ">=" => Ok(compile_compare(Op::Ge, args)),
            "+" => simple(Op::Add, args),
            "-" => simple(Op::Sub, args),
            "*" => simple(Op::Mul, args),
            "/" => simple(Op::Div, args),
            "%" => simple(Op::Mod, args),
            "min" => simple(Op::Min, args),
            "max" => simple(Op::Max, args),
            "in" => Ok(compile_in(args, meta.site)),
            "cat" => simple(Op::Cat, args),
            "substr" => simple(Op::Substr, args),
            "merge" => simple(Op::Merge, args),
            "missing" => simple(Op::Missing, args),
            "missing_some" => simple(Op::MissingSome, args),
            "starts_with" => simple(Op::StartsWith, args),
            "ends_with" => simple(Op::EndsWith, args),
            "map" | "filter" | "all" | "none" | "some" => {
                let kind = match op {
                    "map" => Iter::Map,
                    "filter" => Iter::Filter,
                    "all" => Iter::All,
                    "none" => Iter::None,
                    _ => Iter::Some,
                };
                args.truncate(2);
                while args.len() < 2 {
                    args.push(Node::Lit(Value::Null));
                }
                let [a, b]: [Node; 2] = args.try_into().map_err(|_| "unreachable".to_owned())?;
                Ok(Node::Iter(kind, Box::new([a, b]), meta))
            }
            "reduce" => {
                let has_initial = args.len() >= 3;
                args.truncate(3);
                while args.len() < 3 {
                    args.push(Node::Lit(Value::Null));
                }
                let [a, b, c]: [Node; 3] = args.try_into().map_err(|_| "unreachable".to_owned())?;
                Ok(Node::Reduce(Box::new([a, b, c]), has_initial, meta))
            }
            "fractional" => Ok(Node::Fractional(Box::new(compile_fractional(args)))),
            "sem_ver" => {
                let constant = match (args.len(), args.get(1), args.get(2)) {
                    (3, Some(Node::Lit(op)), Some(Node::Lit(target))) => {
                        Some(op.as_str().and_then(SemverOp::parse).zip(
                            version_text(&Val::from_json(target)).and_then(|t| {
                                Version::normalize_and_parse(&t).map(Version::to_owned_version)
                            }),
                        ))
                    }
                    _ => None,
                };
                Ok(Node::SemVer(Box::new(SemVerNode { args, constant })))
            }
            other => Err(format!("unknown operator {other:?}")),
        }
    }
}

/// A comparison; `var` against a scalar literal gets its own node.
fn compile_compare(op: Op, args: Vec<Node>) -> Node {
    let scalar = |n: &Node| matches!(n, Node::Lit(v) if !v.is_array() && !v.is_object());
    let plain_var = |n: &Node| matches!(n, Node::Var { default: None, .. });
    if args.len() == 2 {
        let var_first = plain_var(&args[0]) && scalar(&args[1]);
        if var_first || (scalar(&args[0]) && plain_var(&args[1])) {
            let mut it = args.into_iter();
            let (a, b) = (it.next(), it.next());
            let (var, lit) = if var_first { (a, b) } else { (b, a) };
            return match (var, lit) {
                (Some(Node::Var { path, .. }), Some(Node::Lit(lit))) => {
                    Node::CmpVarLit(Box::new(CmpVarLit {
                        op,
                        path,
                        lit,
                        var_first,
                    }))
                }
                // Not reached (the shapes were checked above); kept total without a panic.
                (var, lit) => {
                    let (a, b) = if var_first { (var, lit) } else { (lit, var) };
                    Node::Op(op, RULE_SITE, a.into_iter().chain(b).collect())
                }
            };
        }
    }
    Node::Op(op, RULE_SITE, args)
}

/// `in`; a literal list of strings becomes a set.
fn compile_in(mut args: Vec<Node>, site: Site) -> Node {
    if args.len() == 2 {
        if let Node::Lit(Value::Array(items)) = &args[1] {
            if let Some(set) = StringSet::new(items) {
                let needle = args.swap_remove(0);
                return Node::InStrings(Box::new(needle), Box::new(set));
            }
        }
    }
    Node::Op(Op::In, site, args)
}

fn compile_var(args: Vec<Node>) -> Node {
    match args.first() {
        None => Node::Var {
            path: Path {
                segs: vec![],
                root: Root::Attr,
            },
            default: None,
        },
        Some(Node::Lit(p)) if !matches!(p, Value::Array(_) | Value::Object(_)) => {
            let text = match p {
                Value::Null => String::new(),
                Value::String(s) => s.clone(),
                other => Val::from_json(other).to_js_string(),
            };
            let path = split_path(&text);
            let mut args = args.into_iter();
            args.next();
            Node::Var {
                path,
                default: args.next().map(Box::new),
            }
        }
        Some(_) => Node::VarDyn(args),
    }
}

fn split_path(text: &str) -> Path {
    if text.is_empty() {
        return Path {
            segs: vec![],
            root: Root::Attr,
        };
    }
    let segs: Vec<Seg> = text
        .split('.')
        .map(|s| Seg {
            key: s.into(),
            index: canonical_index(s),
        })
        .collect();
    let root = match (segs.first().map(|s| &*s.key), segs.get(1).map(|s| &*s.key)) {
        (Some("$flagd"), Some("flagKey")) => Root::FlagKey,
        (Some("$flagd"), Some("timestamp")) => Root::Timestamp,
        (Some("$flagd"), _) => Root::Flagd,
        (Some("targetingKey"), _) => Root::TargetingKey,
        _ => Root::Attr,
    };
    Path { segs, root }
}

fn compile_fractional(args: Vec<Node>) -> FractionalNode {
    // The first argument is the bucketing expression unless it is itself a distribution.
    let first_is_distribution = matches!(args.first(), Some(Node::Lit(Value::Array(_))));
    let first_is_literal = matches!(args.first(), Some(Node::Lit(_)));
    let dist_start = usize::from(!first_is_distribution);
    let all_literal = args.len() > dist_start
        && args[dist_start..]
            .iter()
            .all(|a| matches!(a, Node::Lit(Value::Array(_))));
    // A literal first argument other than a distribution, a string or null makes the whole
    // operation invalid; the generic path handles that.
    let constant = if all_literal && (first_is_distribution || !first_is_literal) {
        let vals: Vec<Val<'_>> = args[dist_start..]
            .iter()
            .map(|a| match a {
                Node::Lit(v) => Val::from_json(v),
                _ => Val::Null,
            })
            .collect();
        Some(ConstantFractional {
            bucket_by: (!first_is_distribution).then_some(0),
            distribution: Distribution::parse(&vals),
        })
    } else {
        None
    };
    FractionalNode { args, constant }
}

/// What `var` reads: the context (at the top), or an element inside `map`/`filter`/`reduce`.
#[derive(Clone, Copy)]
enum Scope<'s, 'a> {
    Root,
    Item(&'s Val<'a>),
    Reduce {
        current: &'s Val<'a>,
        accumulator: &'s Val<'a>,
    },
}

struct Eval<'a> {
    /// Held by value, so reading the context is one load, not two.
    env: Env<'a>,
    bucketing: FractionalBucketing,
    meter: Meter,
}

impl<'a> Eval<'a> {
    #[cfg(test)]
    fn eval_tail(&self, tail: &'a Tail) -> Val<'a> {
        match tail {
            Tail::Variant(_, v) => Val::from_json(v),
            Tail::Default => Val::Null,
            Tail::If(branches, otherwise) => {
                for (cond, then) in branches {
                    if self.cond(cond) {
                        return self.eval_tail(then);
                    }
                }
                self.eval_tail(otherwise)
            }
            Tail::Fractional(f, _) => self.fractional(f, Scope::Root),
            Tail::Eval(node) => self.eval(node, Scope::Root),
        }
    }

    fn outcome(&self, tail: &'a Tail) -> Outcome<'a> {
        match tail {
            Tail::Variant(i, _) => Outcome::Variant(*i),
            Tail::Default => Outcome::Default,
            Tail::If(branches, otherwise) => {
                for (cond, then) in branches {
                    if self.cond(cond) {
                        return self.outcome(then);
                    }
                }
                self.outcome(otherwise)
            }
            Tail::Fractional(f, outcomes) => self.fractional_outcome(f, outcomes),
            Tail::Eval(node) => match self.eval(node, Scope::Root) {
                Val::Null => Outcome::Default,
                // The flag reads a variant name out of an array or object as text.
                v if v.is_object_like() && !self.charge_coercion(RULE_SITE, &v) => Outcome::Default,
                v => Outcome::Value(v),
            },
        }
    }

    /// [`Eval::fractional`] for a constant distribution, ending in the outcome of the variant
    /// chosen.
    fn fractional_outcome(&self, f: &'a FractionalNode, outcomes: &'a [Tail]) -> Outcome<'a> {
        let Some(c) = &f.constant else {
            return Outcome::Value(self.fractional(f, Scope::Root));
        };
        let bucket_val = c.bucket_by.map(|i| self.eval(&f.args[i], Scope::Root));
        let key = match &bucket_val {
            Some(v) if v.as_str().is_some() => v.as_str().map(fractional::BucketKey::Given),
            Some(Val::Null) | None => self.default_bucket_key(),
            Some(v) if v.array_len().is_some() => {
                return Outcome::Value(self.fractional_generic(f, Scope::Root))
            }
            Some(_) => return Outcome::Default,
        };
        let (Some(key), Some(dist)) = (key, &c.distribution) else {
            return Outcome::Default;
        };
        match dist.pick(&key, self.bucketing) {
            fractional::Pick::Variant(i) => match outcomes.get(i) {
                Some(Tail::Variant(v, _)) => Outcome::Variant(*v),
                Some(t) => self.outcome(t),
                None => Outcome::Default,
            },
            fractional::Pick::NoWeight => Outcome::Default,
            fractional::Pick::PastEnd => Outcome::Value(Val::Str("")),
        }
    }

    fn eval(&self, node: &'a Node, scope: Scope<'_, 'a>) -> Val<'a> {
        match node {
            Node::Lit(v) => Val::from_json(v),
            Node::Array(items) => self.array(items, scope),
            Node::Var { path, default } => match self.lookup(path, scope) {
                Some(v) => v,
                None => match default {
                    Some(d) => self.eval(d, scope),
                    None => Val::Null,
                },
            },
            Node::VarDyn(args) => self.var_dyn(args, scope),
            Node::If(args) => {
                let mut i = 0;
                while i + 1 < args.len() {
                    if self.truthy(&args[i], scope) {
                        return self.eval(&args[i + 1], scope);
                    }
                    i += 2;
                }
                match args.get(i) {
                    Some(last) => self.eval(last, scope),
                    None => Val::Null,
                }
            }
            Node::And(args) => {
                let mut last = Val::Null;
                for a in args {
                    last = self.eval(a, scope);
                    if !last.truthy() {
                        return last;
                    }
                }
                last
            }
            Node::Or(args) => {
                let mut last = Val::Null;
                for a in args {
                    last = self.eval(a, scope);
                    if last.truthy() {
                        return last;
                    }
                }
                last
            }
            Node::Op(op, site, args) => self.op(*op, *site, args, scope),
            Node::CmpVarLit(c) => Val::Bool(self.cmp_var_lit(c, scope)),
            Node::InStrings(needle, set) => Val::Bool(self.in_strings(needle, set, scope)),
            Node::Iter(kind, parts, meta) => self.iter(*kind, &parts[0], &parts[1], *meta, scope),
            Node::Reduce(parts, has_initial, meta) => {
                self.reduce(parts, *has_initial, *meta, scope)
            }
            Node::Fractional(f) => self.fractional(f, scope),
            Node::SemVer(s) => self.sem_ver(s, scope),
        }
    }

    /// `eval(node).truthy()`, without building values for the operations whose result is a
    /// boolean anyway (the conditions of `if`, `and`, `or`, `!`).
    fn truthy(&self, node: &'a Node, scope: Scope<'_, 'a>) -> bool {
        match node {
            // `and` of nothing is null, so false.
            Node::And(args) => !args.is_empty() && args.iter().all(|a| self.truthy(a, scope)),
            Node::Or(args) => args.iter().any(|a| self.truthy(a, scope)),
            Node::Op(op, site, args) => match op {
                Op::Not => !args.first().is_some_and(|a| self.truthy(a, scope)),
                Op::NotNot => args.first().is_some_and(|a| self.truthy(a, scope)),
                Op::Eq
                | Op::Ne
                | Op::StrictEq
                | Op::StrictNe
                | Op::Lt
                | Op::Le
                | Op::Gt
                | Op::Ge => self.compare(*op, args, scope),
                _ => self.op(*op, *site, args, scope).truthy(),
            },
            Node::CmpVarLit(c) => self.cmp_var_lit(c, scope),
            Node::InStrings(needle, set) => self.in_strings(needle, set, scope),
            Node::Lit(v) => Val::from_json(v).truthy(),
            other => self.eval(other, scope).truthy(),
        }
    }

    /// The JSON a `var` path reads from the context's attributes, without building a value; the
    /// outer `None` when the path is not a plain attribute path read at the top.
    fn attribute_json(&self, path: &'a Path, scope: Scope<'_, 'a>) -> Option<Option<&'a Value>> {
        match (scope, &path.root) {
            (Scope::Root, Root::Attr) => {
                let (first, rest) = path.segs.split_first()?;
                let mut v = attribute(self.env.ctx, &first.key);
                for s in rest {
                    v = match v {
                        Some(Value::Object(m)) => m.get(&*s.key),
                        Some(Value::Array(a)) => s.index.and_then(|i| a.get(i)),
                        _ => None,
                    };
                }
                Some(v)
            }
            _ => None,
        }
    }

    fn cmp_var_lit(&self, c: &'a CmpVarLit, scope: Scope<'_, 'a>) -> bool {
        // Fast paths: a string or number attribute against a literal of the same type, where
        // JavaScript's coercions change nothing.
        if let Some(found) = self.attribute_json(&c.path, scope) {
            match (found, &c.lit) {
                (Some(Value::String(a)), Value::String(b)) => match c.op {
                    Op::Eq | Op::StrictEq => return str_eq(a, b),
                    Op::Ne | Op::StrictNe => return !str_eq(a, b),
                    _ => {
                        let (a, b) = if c.var_first { (a, b) } else { (b, a) };
                        if let Some(r) = compare_same(c.op, a.as_str().cmp(b.as_str())) {
                            return r;
                        }
                    }
                },
                (Some(Value::Number(a)), Value::Number(b)) => {
                    if let (Some(a), Some(b)) = (a.as_f64(), b.as_f64()) {
                        let (a, b) = if c.var_first { (a, b) } else { (b, a) };
                        if let Some(ord) = a.partial_cmp(&b) {
                            if let Some(r) = compare_same(c.op, ord) {
                                return r;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        let var = self.coercible(RULE_SITE, self.lookup(&c.path, scope).unwrap_or(Val::Null));
        compare_vals(c.op, c.var_first, &var, &Val::from_json(&c.lit))
    }

    /// A condition's truthiness.
    #[inline]
    fn cond(&self, c: &'a Cond) -> bool {
        match c {
            // The members are evaluated in place: one call for the whole `and`, not one each.
            Cond::All(all) => {
                all.str_eq.iter().all(|c| self.attr_str_eq(c))
                    && all.num.iter().all(|c| self.attr_num(c))
                    && all.attr_in.iter().all(|(key, set)| self.attr_in(key, set))
                    && all.rest.iter().all(|c| self.cond_inline(c))
            }
            Cond::Any(cs) => cs.iter().any(|c| self.cond_inline(c)),
            Cond::Not(c) => !self.cond_inline(c),
            other => self.cond_inline(other),
        }
    }

    /// [`Eval::cond`] with the comparisons of attributes inlined into the caller.
    #[inline(always)]
    fn cond_inline(&self, c: &'a Cond) -> bool {
        match c {
            Cond::All(_) | Cond::Any(_) | Cond::Not(_) => self.cond(c),
            Cond::AttrStrEq(c) => self.attr_str_eq(c),
            Cond::AttrStr(c) => {
                let found = attribute(self.env.ctx, &c.key);
                if let Some(Value::String(a)) = found {
                    if let Some(r) = compare_same(c.op, a.as_str().cmp(&c.lit)) {
                        return r;
                    }
                }
                self.attr_cmp_generic(c.op, found, &Val::Str(&c.lit))
            }
            Cond::AttrNum(c) => self.attr_num(c),
            Cond::AttrIn(key, set) => self.attr_in(key, set),
            Cond::AttrSemVer(sv) => {
                let (key, op, target) = &**sv;
                let actual = match attribute(self.env.ctx, key) {
                    Some(Value::String(s)) => {
                        if let (Some(a), Some(b)) = (Release::parse(s), target.release()) {
                            return op.apply_release(a, b);
                        }
                        Version::normalize_and_parse(s)
                    }
                    found => return sem_ver_generic(found, *op, target),
                };
                // An unparsable version makes the operation null, so false.
                actual.is_some_and(|v| op.apply(&v, &target.view()))
            }
            Cond::Node(node) => self.truthy(node, Scope::Root),
        }
    }

    #[inline(always)]
    fn attr_str_eq(&self, c: &AttrCmp<Box<str>>) -> bool {
        let found = attribute(self.env.ctx, &c.key);
        if let Some(Value::String(a)) = found {
            // Between two strings, `==` is `===`.
            return str_eq(a, &c.lit) == matches!(c.op, Op::Eq | Op::StrictEq);
        }
        self.attr_cmp_generic(c.op, found, &Val::Str(&c.lit))
    }

    #[inline(always)]
    fn attr_num(&self, c: &AttrCmp<f64>) -> bool {
        let found = attribute(self.env.ctx, &c.key);
        if let Some(Value::Number(n)) = found {
            if let Some(r) = n.as_f64().and_then(|a| compare_numbers(c.op, a, c.lit)) {
                return r;
            }
        }
        self.attr_cmp_generic(c.op, found, &Val::Num(c.lit))
    }

    #[inline(always)]
    fn attr_in(&self, key: &str, set: &StringSet) -> bool {
        // Every element is a string, so only a string can be strictly equal to one.
        matches!(attribute(self.env.ctx, key), Some(Value::String(s)) if set.contains(s))
    }

    fn in_strings(&self, needle: &'a Node, set: &StringSet, scope: Scope<'_, 'a>) -> bool {
        if let Node::Var {
            path,
            default: None,
        } = needle
        {
            if let Some(found) = self.attribute_json(path, scope) {
                return matches!(found, Some(Value::String(s)) if set.contains(s));
            }
        }
        // Every element is a string, so only a string needle can be strictly equal to one.
        match self.eval(needle, scope).as_str() {
            Some(s) => set.contains(s),
            None => false,
        }
    }

    /// The comparison operations, as booleans.
    fn compare(&self, op: Op, args: &'a [Node], scope: Scope<'_, 'a>) -> bool {
        // Comparisons turn arrays and objects into text.
        let arg = |i: usize| -> Val<'a> {
            match args.get(i) {
                Some(n) => self.eval_coercible(n, scope),
                None => Val::Null,
            }
        };
        match op {
            Op::Eq => arg(0).loose_eq(&arg(1)),
            Op::Ne => !arg(0).loose_eq(&arg(1)),
            Op::StrictEq => arg(0).strict_eq(&arg(1)),
            Op::StrictNe => !arg(0).strict_eq(&arg(1)),
            Op::Lt | Op::Le => {
                if args.len() < 2 {
                    // Comparing with JavaScript's `undefined` is always false.
                    let _ = arg(0);
                    return false;
                }
                let strict = op == Op::Lt;
                let cmp = |a: &Val<'_>, b: &Val<'_>| {
                    if strict {
                        a.less_than(b) == Some(true)
                    } else {
                        b.less_than(a) == Some(false)
                    }
                };
                let (a, b) = (arg(0), arg(1));
                if args.len() >= 3 {
                    let c = arg(2);
                    cmp(&a, &b) && cmp(&b, &c)
                } else {
                    cmp(&a, &b)
                }
            }
            Op::Gt | Op::Ge => {
                if args.len() < 2 {
                    let _ = arg(0);
                    return false;
                }
                let (a, b) = (arg(0), arg(1));
                if op == Op::Gt {
                    b.less_than(&a) == Some(true)
                } else {
                    a.less_than(&b) == Some(false)
                }
            }
            _ => self.op(op, RULE_SITE, args, scope).truthy(),
        }
    }

    /// A comparison of an attribute (absent: null, the left operand) with a literal, the long way.
    #[inline(never)]
    fn attr_cmp_generic(&self, op: Op, found: Option<&'a Value>, lit: &Val<'_>) -> bool {
        let var = found.map_or(Val::Null, Val::from_json);
        let var = self.coercible(RULE_SITE, var);
        compare_vals(op, true, &var, lit)
    }

    /// Charges turning an array or object into text, as JavaScript's coercions do (`==` with a
    /// string, arithmetic, `cat`); `false` when that is over budget.
    #[inline(never)]
    fn charge_coercion(&self, site: Site, v: &Val<'_>) -> bool {
        match self.text_len(site, v) {
            Some(len) => self.meter.charge_text(site, len, true),
            None => false,
        }
    }

    /// `v`, charged for the text a coercion makes of it when it is an array or object; null
    /// when that is over budget (the result is an error then, so the value no longer matters,
    /// and null costs nothing to coerce).
    #[inline]
    fn coercible(&self, site: Site, v: Val<'a>) -> Val<'a> {
        if v.is_object_like() && !self.charge_coercion(site, &v) {
            Val::Null
        } else {
            v
        }
    }

    /// `eval` for an operand a coercion may turn into text.
    #[inline]
    fn eval_coercible(&self, node: &'a Node, scope: Scope<'_, 'a>) -> Val<'a> {
        self.coercible(RULE_SITE, self.eval(node, scope))
    }

    /// At most how long String(v) is, weighed within the bytes left; `None` (and the budget
    /// exhausted) when longer.
    fn text_len(&self, site: Site, v: &Val<'_>) -> Option<usize> {
        match v {
            Val::Str(s) => Some(s.len()),
            Val::String(s) => Some(s.len()),
            other => match crate::val::js_len_within(other, self.meter.bytes_left()) {
                Some(len) => Some(len),
                None => {
                    self.meter.charge(site, 0, u64::MAX);
                    None
                }
            },
        }
    }

    /// Charges copying `v` as JSON; `false` when over budget.
    fn charge_copy(&self, site: Site, v: &Val<'_>) -> bool {
        match crate::val::copy_weight_within(v, self.meter.bytes_left()) {
            Some(w) => self
                .meter
                .charge(site, w as u64 / BUDGET_BYTES_PER_STEP + 1, w as u64),
            None => self.meter.charge(site, 0, u64::MAX),
        }
    }

    /// Charges copying the whole context (`{"var": ""}` at the top); `false` when over budget.
    fn charge_context_copy(&self) -> bool {
        let cap = self.meter.bytes_left();
        let mut total = VALUE_BYTES;
        for (k, v) in &self.env.ctx.attributes {
            match crate::val::copy_weight_within(&Val::from_json(v), cap.saturating_sub(total)) {
                Some(w) => total = total.saturating_add(w + k.len()),
                None => return self.meter.charge(RULE_SITE, 0, u64::MAX),
            }
        }
        let w = total as u64;
        self.meter
            .charge(RULE_SITE, w / BUDGET_BYTES_PER_STEP + 1, w)
    }

    #[inline(never)]
    fn array(&self, items: &'a [Node], scope: Scope<'_, 'a>) -> Val<'a> {
        if !self
            .meter
            .charge(RULE_SITE, 0, items.len() as u64 * VALUE_BYTES as u64)
        {
            return Val::Null;
        }
        Val::Array(Rc::new(items.iter().map(|i| self.eval(i, scope)).collect()))
    }

    #[inline(never)]
    fn var_dyn(&self, args: &'a [Node], scope: Scope<'_, 'a>) -> Val<'a> {
        let vals: Vec<Val<'a>> = args.iter().map(|a| self.eval_coercible(a, scope)).collect();
        let text = match vals.first() {
            None | Some(Val::Null) => String::new(),
            Some(v) => v.to_js_string(),
        };
        match self.lookup(&split_path(&text), scope) {
            Some(v) => v,
            None => vals.into_iter().nth(1).unwrap_or(Val::Null),
        }
    }

    #[inline(never)]
    fn reduce(
        &self,
        parts: &'a [Node; 3],
        has_initial: bool,
        meta: Meta,
        scope: Scope<'_, 'a>,
    ) -> Val<'a> {
        let initial = if has_initial {
            self.eval(&parts[2], scope)
        } else {
            Val::Null
        };
        let data = self.eval(&parts[0], scope);
        let Some(items) = self.elements(meta.site, &data, 0) else {
            return initial;
        };
        let per_item = u64::from(meta.body) + 1;
        let mut acc = initial;
        for item in &items {
            if !self.meter.charge(meta.site, per_item, 0) {
                return Val::Null;
            }
            acc = self.eval(
                &parts[1],
                Scope::Reduce {
                    current: item,
                    accumulator: &acc,
                },
            );
        }
        acc
    }

    /// Reads a static path; `None` when JavaScript would find `undefined` (the default applies).
    fn lookup(&self, path: &Path, scope: Scope<'_, 'a>) -> Option<Val<'a>> {
        match scope {
            Scope::Root => self.lookup_root(path),
            Scope::Item(item) => lookup_in_val(item, &path.segs),
            Scope::Reduce {
                current,
                accumulator,
            } => {
                let Some((first, rest)) = path.segs.split_first() else {
                    if !(self.charge_copy(RULE_SITE, current)
                        && self.charge_copy(RULE_SITE, accumulator))
                    {
                        return Some(Val::Null);
                    }
                    let mut m = serde_json::Map::new();
                    m.insert("current".into(), current.to_value());
                    m.insert("accumulator".into(), accumulator.to_value());
                    return Some(Val::Owned(Rc::new(Value::Object(m))));
                };
                let base = match &*first.key {
                    "current" => current,
                    "accumulator" => accumulator,
                    _ => return None,
                };
                lookup_in_val(base, rest)
            }
        }
    }

    fn lookup_root(&self, path: &Path) -> Option<Val<'a>> {
        let ctx = self.env.ctx;
        let Some((first, rest)) = path.segs.split_first() else {
            if !self.charge_context_copy() {
                return Some(Val::Null);
            }
            return Some(Val::from_owned_json(ctx.to_data(self.env.flag_key)));
        };
        match path.root {
            Root::FlagKey => {
                if path.segs.len() == 2 {
                    Some(Val::Str(self.env.flag_key))
                } else {
                    // Members of a string (`length`, indexes) are JavaScript oddities rules do
                    // not rely on: treated as absent.
                    None
                }
            }
            Root::Timestamp => (path.segs.len() == 2).then_some(Val::Num(ctx.timestamp as f64)),
            Root::Flagd => {
                let props = flagd_properties(self.env.flag_key, ctx.timestamp);
                let mut v = &props;
                for s in rest {
                    v = lookup_json(v, &s.key)?;
                }
                Some(Val::from_owned_json(v.clone()))
            }
            Root::TargetingKey => match &ctx.targeting_key {
                Some(k) if rest.is_empty() => Some(Val::Str(k)),
                Some(_) => None,
                None => lookup_json_path(attribute(ctx, &first.key)?, rest),
            },
            Root::Attr => lookup_json_path(attribute(ctx, &first.key)?, rest),
        }
    }

    fn op(&self, op: Op, site: Site, args: &'a [Node], scope: Scope<'_, 'a>) -> Val<'a> {
        let arg = |i: usize| -> Val<'a> {
            match args.get(i) {
                Some(n) => self.eval(n, scope),
                None => Val::Null,
            }
        };
        // An operand of arithmetic, which turns arrays and objects into text.
        let num_arg = |i: usize| -> Val<'a> {
            match args.get(i) {
                Some(n) => self.eval_coercible(n, scope),
                None => Val::Null,
            }
        };
        match op {
            Op::Eq | Op::Ne | Op::StrictEq | Op::StrictNe | Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                Val::Bool(self.compare(op, args, scope))
            }
            Op::Not => Val::Bool(!arg(0).truthy()),
            Op::NotNot => Val::Bool(arg(0).truthy()),
            Op::Add => Val::Num(
                args.iter()
                    .map(|n| self.eval_coercible(n, scope).parse_float())
                    .fold(0.0, |a, b| a + b),
            ),
            Op::Mul => {
                let mut vals = args.iter().map(|n| self.eval_coercible(n, scope));
                let Some(first) = vals.next() else {
                    // Array.reduce on no values throws in json-logic-js; null here.
                    return Val::Null;
                };
                if args.len() == 1 {
                    // reduce with one value and no initial value returns it unchanged.
                    return first;
                }
                Val::Num(vals.fold(first.parse_float(), |a, b| a * b.parse_float()))
            }
            Op::Sub => match args.len() {
                0 => Val::Num(f64::NAN),
                1 => Val::Num(-num_arg(0).to_number()),
                _ => Val::Num(num_arg(0).to_number() - num_arg(1).to_number()),
            },
            Op::Div => Val::Num(num_arg(0).to_number() / num_or_nan(args, 1, &num_arg)),
            Op::Mod => Val::Num(js_rem(
                num_arg(0).to_number(),
                num_or_nan(args, 1, &num_arg),
            )),
            Op::Min | Op::Max => {
                let is_min = op == Op::Min;
                let mut acc = if is_min {
                    f64::INFINITY
                } else {
                    f64::NEG_INFINITY
                };
                for n in args {
                    let x = self.eval_coercible(n, scope).to_number();
                    if x.is_nan() || acc.is_nan() {
                        acc = f64::NAN;
                    } else if (is_min && x < acc) || (!is_min && x > acc) {
                        acc = x;
                    }
                }
                Val::Num(acc)
            }
            Op::In => self.in_op(site, arg(0), arg(1)),
            Op::Cat => {
                if let [only] = args {
                    if let v @ (Val::Str(_) | Val::String(_)) = self.eval(only, scope) {
                        return v;
                    }
                }
                let mut out = String::new();
                for n in args {
                    let v = self.eval(n, scope);
                    let Some(len) = self.text_len(site, &v) else {
                        return Val::Null;
                    };
                    if !self.meter.charge_text(site, len, true) {
                        return Val::Null;
                    }
                    v.write_js_string(&mut out);
                }
                Val::String(out)
            }
            Op::Substr => {
                let source = arg(0);
                let Some(len) = self.text_len(site, &source) else {
                    return Val::Null;
                };
                // The text, its characters (four bytes each) and the part taken.
                let len = len as u64;
                if !self
                    .meter
                    .charge(site, len / BUDGET_BYTES_PER_STEP + 1, len.saturating_mul(6))
                {
                    return Val::Null;
                }
                let source = source.to_js_string();
                let start = to_integer(num_arg(1).to_number());
                let length = if args.len() >= 3 {
                    Some(to_integer(num_arg(2).to_number()))
                } else {
                    None
                };
                Val::String(substr(&source, start, length))
            }
            Op::Merge => {
                let mut out = Vec::new();
                for n in args {
                    let v = self.eval(n, scope);
                    let len = v.array_len().unwrap_or(1).max(1) as u64;
                    if !self.meter.charge(site, len, len * VALUE_BYTES as u64) {
                        return Val::Null;
                    }
                    match &v {
                        Val::Json(Value::Array(items)) => {
                            out.extend(items.iter().map(Val::from_json))
                        }
                        Val::Array(items) => out.extend(items.iter().cloned()),
                        _ => match v.array_items() {
                            Some(items) => out.extend(items),
                            None => out.push(v),
                        },
                    }
                }
                Val::Array(Rc::new(out))
            }
            Op::Missing => {
                let vals: Vec<Val<'a>> = args.iter().map(|n| self.eval(n, scope)).collect();
                self.missing(site, vals, scope)
            }
            Op::MissingSome => {
                let need = num_arg(0).to_number();
                let options = arg(1);
                let Some(keys) = self.elements(site, &options, 0) else {
                    let missing = self.missing(site, vec![options.clone()], scope);
                    return match options.array_len() {
                        Some(total) if total as f64 - len_of(&missing) >= need => {
                            Val::Array(Rc::default())
                        }
                        _ => missing,
                    };
                };
                let total = keys.len() as f64;
                let missing = self.missing(site, keys, scope);
                if total - len_of(&missing) >= need {
                    Val::Array(Rc::default())
                } else {
                    missing
                }
            }
            Op::StartsWith | Op::EndsWith => {
                if args.len() != 2 {
                    return Val::Null;
                }
                let (a, b) = (arg(0), arg(1));
                match (a.as_str(), b.as_str()) {
                    (Some(s), Some(t)) => Val::Bool(if op == Op::StartsWith {
                        s.starts_with(t)
                    } else {
                        s.ends_with(t)
                    }),
                    _ => Val::Null,
                }
            }
        }
    }

    /// `in`: a substring of a string, or an element of an array.
    #[inline(never)]
    fn in_op(&self, site: Site, needle: Val<'a>, hay: Val<'a>) -> Val<'a> {
        match &hay {
            Val::Str(_) | Val::String(_) if hay.as_str() != Some("") => {
                let Some(needle_len) = self.text_len(site, &needle) else {
                    return Val::Null;
                };
                let hay_str = hay.as_str().unwrap_or_default();
                if !self.meter.charge_text(
                    site,
                    hay_str.len() + needle_len,
                    needle.as_str().is_none(),
                ) {
                    return Val::Null;
                }
                Val::Bool(contains_str(hay_str, &needle))
            }
            // Searched in place: literal lists are the common haystack.
            Val::Json(Value::Array(items)) => {
                if !self.meter.charge(site, items.len() as u64 + 1, 0) {
                    return Val::Null;
                }
                Val::Bool(items.iter().any(|i| Val::from_json(i).strict_eq(&needle)))
            }
            Val::Array(items) => {
                if !self.meter.charge(site, items.len() as u64 + 1, 0) {
                    return Val::Null;
                }
                Val::Bool(items.iter().any(|i| i.strict_eq(&needle)))
            }
            other => match self.elements(site, other, 1) {
                Some(items) => Val::Bool(items.iter().any(|i| i.strict_eq(&needle))),
                None => Val::Bool(false),
            },
        }
    }

    /// The elements of an array, charged a step each (`steps` per element) and the memory of the
    /// list; `None` when `v` is not an array, or (with the budget exhausted) when over budget.
    fn elements(&self, site: Site, v: &Val<'a>, steps: u64) -> Option<Vec<Val<'a>>> {
        let n = v.array_len()? as u64;
        if !self
            .meter
            .charge(site, n * steps + 1, n * VALUE_BYTES as u64)
        {
            return None;
        }
        v.array_items()
    }

    #[inline(never)]
    fn missing(&self, site: Site, vals: Vec<Val<'a>>, scope: Scope<'_, 'a>) -> Val<'a> {
        let keys: Vec<Val<'a>> = match vals.first().and_then(|v| self.elements(site, v, 0)) {
            Some(items) => items,
            None => vals,
        };
        let mut out = Vec::new();
        for key in keys {
            let Some(len) = self.text_len(site, &key) else {
                return Val::Null;
            };
            if !self.meter.charge_text(site, len, true) {
                return Val::Null;
            }
            let text = match &key {
                Val::Null => String::new(),
                other => other.to_js_string(),
            };
            let found = self.lookup(&split_path(&text), scope);
            let absent = match &found {
                None | Some(Val::Null) => true,
                Some(v) => v.as_str() == Some(""),
            };
            if absent {
                out.push(key);
            }
        }
        Val::Array(Rc::new(out))
    }

    #[inline(never)]
    fn iter(
        &self,
        kind: Iter,
        data: &'a Node,
        logic: &'a Node,
        meta: Meta,
        scope: Scope<'_, 'a>,
    ) -> Val<'a> {
        let data = self.eval(data, scope);
        if data.array_len().is_none() {
            return match kind {
                Iter::Map | Iter::Filter => Val::Array(Rc::default()),
                Iter::All | Iter::Some => Val::Bool(false),
                Iter::None => Val::Bool(true),
            };
        }
        // `map` and `filter` build a list as long again.
        let lists = if matches!(kind, Iter::Map | Iter::Filter) {
            2
        } else {
            1
        };
        let n = data.array_len().unwrap_or(0) as u64;
        if !self
            .meter
            .charge(meta.site, 0, (lists - 1) * n * VALUE_BYTES as u64)
        {
            return Val::Null;
        }
        let Some(items) = self.elements(meta.site, &data, 0) else {
            return Val::Null;
        };
        let per_item = u64::from(meta.body) + 1;
        let body = |i: &Val<'a>| -> Option<Val<'a>> {
            self.meter
                .charge(meta.site, per_item, 0)
                .then(|| self.eval(logic, Scope::Item(i)))
        };
        match kind {
            Iter::Map => {
                let mut out = Vec::with_capacity(items.len());
                for i in &items {
                    let Some(v) = body(i) else {
                        return Val::Null;
                    };
                    out.push(v);
                }
                Val::Array(Rc::new(out))
            }
            Iter::Filter => {
                let mut out = Vec::new();
                for i in items {
                    let Some(v) = body(&i) else {
                        return Val::Null;
                    };
                    if v.truthy() {
                        out.push(i);
                    }
                }
                Val::Array(Rc::new(out))
            }
            Iter::All | Iter::None | Iter::Some => {
                // `all` needs every element truthy (and one at least); `some` one; `none` none.
                let stop_on = kind != Iter::All;
                for i in &items {
                    let Some(v) = body(i) else {
                        return Val::Null;
                    };
                    if v.truthy() == stop_on {
                        return Val::Bool(kind == Iter::Some);
                    }
                }
                Val::Bool(match kind {
                    Iter::All => !items.is_empty(),
                    Iter::None => true,
                    _ => false,
                })
            }
        }
    }

    fn fractional(&self, f: &'a FractionalNode, scope: Scope<'_, 'a>) -> Val<'a> {
        if let Some(c) = &f.constant {
            let bucket_val = c.bucket_by.map(|i| self.eval(&f.args[i], scope));
            let key = match &bucket_val {
                Some(v) if v.as_str().is_some() => v.as_str().map(fractional::BucketKey::Given),
                Some(Val::Null) | None => self.default_bucket_key(),
                // An array from the bucketing expression would be a distribution: evaluate the
                // operation the long way.
                Some(v) if v.array_len().is_some() => return self.fractional_generic(f, scope),
                Some(_) => return Val::Null,
            };
            let (Some(key), Some(dist)) = (key, &c.distribution) else {
                return Val::Null;
            };
            return dist.choose(&key, self.bucketing);
        }
        self.fractional_generic(f, scope)
    }

    #[inline(never)]
    fn fractional_generic(&self, f: &'a FractionalNode, scope: Scope<'_, 'a>) -> Val<'a> {
        let vals: Vec<Val<'a>> = f.args.iter().map(|a| self.eval(a, scope)).collect();
        let Some(first) = vals.first() else {
            return Val::Null;
        };
        let (key, rest) = match first {
            Val::Str(s) => (Some(fractional::BucketKey::Given(s)), &vals[1..]),
            Val::String(s) => (Some(fractional::BucketKey::Given(s)), &vals[1..]),
            Val::Null => (self.default_bucket_key(), &vals[1..]),
            _ => (self.default_bucket_key(), &vals[..]),
        };
        let Some(key) = key else {
            return Val::Null;
        };
        match Distribution::parse(rest) {
            Some(d) => Val::from_owned_json(d.choose(&key, self.bucketing).to_value()),
            None => Val::Null,
        }
    }

    /// flagKey + targetingKey; `None` (so the operation answers null) without a string key.
    fn default_bucket_key(&self) -> Option<fractional::BucketKey<'a>> {
        match self.env.ctx.targeting_key_value()? {
            crate::context::TargetingKey::Str("") => None,
            crate::context::TargetingKey::Str(k) => Some(fractional::BucketKey::FlagAndTargeting(
                self.env.flag_key,
                k,
            )),
            crate::context::TargetingKey::Other => None,
        }
    }

    fn sem_ver(&self, s: &'a SemVerNode, scope: Scope<'_, 'a>) -> Val<'a> {
        if s.args.len() != 3 {
            return Val::Null;
        }
        let actual = self.eval(&s.args[0], scope);
        let Some(actual_text) = version_text(&actual) else {
            return Val::Null;
        };
        let Some(actual) = Version::normalize_and_parse(&actual_text) else {
            return Val::Null;
        };
        let result = match &s.constant {
            Some(Some((op, target))) => op.apply(&actual, &target.view()),
            Some(None) => return Val::Null,
            None => {
                let op = self.eval(&s.args[1], scope);
                let target = self.eval(&s.args[2], scope);
                let Some(op) = op.as_str().and_then(SemverOp::parse) else {
                    return Val::Null;
                };
                let Some(target_text) = version_text(&target) else {
                    return Val::Null;
                };
                let Some(target) = Version::normalize_and_parse(&target_text) else {
                    return Val::Null;
                };
                op.apply(&actual, &target)
            }
        };
        Val::Bool(result)
    }
}

/// A comparison operation on two values, with JavaScript's coercions; the variable first or not.
fn compare_vals(op: Op, var_first: bool, var: &Val<'_>, lit: &Val<'_>) -> bool {
    let (a, b) = if var_first { (var, lit) } else { (lit, var) };
    match op {
        Op::Eq => a.loose_eq(b),
        Op::Ne => !a.loose_eq(b),
        Op::StrictEq => a.strict_eq(b),
        Op::StrictNe => !a.strict_eq(b),
        Op::Lt => a.less_than(b) == Some(true),
        Op::Le => b.less_than(a) == Some(false),
        Op::Gt => b.less_than(a) == Some(true),
        Op::Ge => a.less_than(b) == Some(false),
        // Only comparisons are compiled into comparison nodes.
        _ => false,
    }
}

/// `sem_ver` of an attribute that is not a string (absent: null), the long way.
#[inline(never)]
fn sem_ver_generic(found: Option<&Value>, op: SemverOp, target: &OwnedVersion) -> bool {
    let actual = found.map_or(Val::Null, Val::from_json);
    let Some(text) = version_text(&actual) else {
        return false;
    };
    Version::normalize_and_parse(&text).is_some_and(|v| op.apply(&v, &target.view()))
}

/// A comparison of two values of one type (both strings or both non-NaN numbers), given their
/// order; `None` for operations that are not comparisons.
fn compare_same(op: Op, ord: std::cmp::Ordering) -> Option<bool> {
    use std::cmp::Ordering::*;
    Some(match op {
        Op::Eq | Op::StrictEq => ord == Equal,
        Op::Ne | Op::StrictNe => ord != Equal,
        Op::Lt => ord == Less,
        Op::Le => ord != Greater,
        Op::Gt => ord == Greater,
        Op::Ge => ord != Less,
        _ => return None,
    })
}

/// A comparison of two numbers, as JavaScript compares them (NaN included: only `!=` holds);
/// `None` for operations that are not comparisons.
fn compare_numbers(op: Op, a: f64, b: f64) -> Option<bool> {
    Some(match op {
        Op::Eq | Op::StrictEq => a == b,
        Op::Ne | Op::StrictNe => a != b,
        Op::Lt => a < b,
        Op::Le => a <= b,
        Op::Gt => a > b,
        Op::Ge => a >= b,
        _ => return None,
    })
}

/// Contexts are small: below this many attributes a scan beats hashing the key.
const SCAN_ATTRIBUTES: usize = 12;

fn attribute<'c>(ctx: &'c EvaluationContext, key: &str) -> Option<&'c Value> {
    if ctx.attributes.len() <= SCAN_ATTRIBUTES {
        ctx.attributes
            .iter()
            .find_map(|(k, v)| str_eq(k, key).then_some(v))
    } else {
        ctx.attributes.get(key)
    }
}

/// Reads `segs` below a value produced during evaluation.
fn lookup_in_val<'a>(base: &Val<'a>, segs: &[Seg]) -> Option<Val<'a>> {
    let Some((first, rest)) = segs.split_first() else {
        return Some(base.clone());
    };
    match base {
        Val::Json(v) => lookup_json_path(v, segs),
        Val::Array(items) => lookup_in_val(items.get(first.index?)?, rest),
        Val::Owned(v) => {
            let mut cur: &Value = v;
            for s in segs {
                cur = lookup_json(cur, &s.key)?;
            }
            Some(Val::from_owned_json(cur.clone()))
        }
        _ => None,
    }
}

fn lookup_json_path<'a>(mut v: &'a Value, segs: &[Seg]) -> Option<Val<'a>> {
    for s in segs {
        v = match v {
            Value::Object(m) => m.get(&*s.key)?,
            Value::Array(a) => a.get(s.index?)?,
            _ => return None,
        };
    }
    Some(Val::from_json(v))
}

/// The length of a list `missing` returned.
fn len_of(v: &Val<'_>) -> f64 {
    v.array_len().unwrap_or(0) as f64
}

fn num_or_nan<'a>(args: &[Node], i: usize, arg: &impl Fn(usize) -> Val<'a>) -> f64 {
    if args.len() > i {
        arg(i).to_number()
    } else {
        f64::NAN
    }
}

/// JavaScript's `%`: the remainder takes the dividend's sign (Rust's `%` on floats does too).
fn js_rem(a: f64, b: f64) -> f64 {
    a % b
}

fn contains_str(hay: &str, needle: &Val<'_>) -> bool {
    match needle.as_str() {
        Some(n) => hay.contains(n),
        None => hay.contains(needle.to_js_string().as_str()),
    }
}

/// JavaScript's ToIntegerOrInfinity.
fn to_integer(n: f64) -> f64 {
    if n.is_nan() {
        0.0
    } else {
        n.trunc()
    }
}

/// String.prototype.substr, counting characters (JavaScript counts UTF-16 units; the two agree
/// outside the astral planes). json-logic-js treats a negative length as "stop that many
/// characters before the end".
fn substr(source: &str, start: f64, length: Option<f64>) -> String {
    let chars: Vec<char> = source.chars().collect();
    let size = chars.len() as f64;
    let from = if start < 0.0 {
        (size + start).max(0.0)
    } else {
        start.min(size)
    };
    let avail = size - from;
    let take = match length {
        None => avail,
        Some(l) if l < 0.0 => (avail + l).max(0.0),
        Some(l) => l.min(avail).max(0.0),
    };
    let (from, take) = (from as usize, take as usize);
    chars[from..from + take].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Evaluates `rule` for flag `flag` against the OFREP-style context `data` at time 1000.
    pub(crate) fn eval_with(rule: Value, data: Value, bucketing: FractionalBucketing) -> Value {
        let options = CompileOptions {
            fractional: bucketing,
        };
        let compiled = Rule::compile(&rule, &IndexMap::new(), &options).unwrap();
        let ctx = EvaluationContext::from_value(&data, 1000).unwrap();
        let env = Env::new("flag", &ctx);
        compiled.evaluate(&env).to_value()
    }

    fn eval(rule: Value, data: Value) -> Value {
        eval_with(rule, data, FractionalBucketing::V2)
    }

    fn check(cases: &[(Value, Value, Value)]) {
        for (rule, data, want) in cases {
            assert_eq!(
                &eval(rule.clone(), data.clone()),
                want,
                "rule {rule} with data {data}"
            );
        }
    }

    #[test]
    fn packed_string_sets_tell_apart_what_bytes_alone_would_not() {
        let set = StringSet::new(&[json!("a"), json!(""), json!("PT")]).unwrap();
        assert!(matches!(set, StringSet::Packed(_)));
        for (s, want) in [
            ("a", true),
            ("", true),
            ("PT", true),
            ("a\0", false),
            ("\0", false),
            ("P", false),
            ("PTPTPTPT", false),
        ] {
            assert_eq!(set.contains(s), want, "{s:?}");
        }
        let long = StringSet::new(&[json!("enterprise"), json!("a")]).unwrap();
        assert!(matches!(long, StringSet::Few(_)));
        assert!(long.contains("enterprise") && long.contains("a") && !long.contains("b"));
    }

    #[test]
    fn var_reads_dotted_paths_indexes_defaults_and_whole_data() {
        let data = json!({"a": {"b": [10, {"c": "deep"}]}, "n": null, "targetingKey": "u1"});
        check(&[
            (json!({"var": "a.b.0"}), data.clone(), json!(10)),
            (json!({"var": "a.b.1.c"}), data.clone(), json!("deep")),
            (json!({"var": ["a.x", "dflt"]}), data.clone(), json!("dflt")),
            (json!({"var": ["n", "dflt"]}), data.clone(), json!(null)),
            (json!({"var": "a.b.01"}), data.clone(), json!(null)),
            (json!({"var": 1}), json!({"1": "one"}), json!("one")),
            (json!({"var": "targetingKey"}), data.clone(), json!("u1")),
            (
                json!({"var": "$flagd.flagKey"}),
                data.clone(),
                json!("flag"),
            ),
            (
                json!({"var": "$flagd.timestamp"}),
                data.clone(),
                json!(1000),
            ),
            (json!({"var": "$flagd.other"}), data.clone(), json!(null)),
            (
                json!({"var": ""}),
                json!({"x": 1}),
                json!({"x": 1, "$flagd": {"flagKey": "flag", "timestamp": 1000}}),
            ),
            (
                json!({"var": {"cat": ["a", ".b.0"]}}),
                data.clone(),
                json!(10),
            ),
            (json!({"var": [{"cat": ["zz"]}, 5]}), data, json!(5)),
        ]);
    }

    #[test]
    fn missing_and_missing_some_report_absent_or_empty_keys() {
        let data = json!({"a": 1, "e": "", "n": null, "o": {"p": 2}});
        check(&[
            (
                json!({"missing": ["a", "b", "e", "n", "o.p", "o.q"]}),
                data.clone(),
                json!(["b", "e", "n", "o.q"]),
            ),
            (json!({"missing": "b"}), data.clone(), json!(["b"])),
            (
                json!({"missing": {"merge": ["a", "z"]}}),
                data.clone(),
                json!(["z"]),
            ),
            (
                json!({"missing_some": [1, ["a", "b"]]}),
                data.clone(),
                json!([]),
            ),
            (
                json!({"missing_some": [2, ["a", "b", "c"]]}),
                data,
                json!(["b", "c"]),
            ),
        ]);
    }

    #[test]
    fn if_chains_and_and_or_return_operands() {
        check(&[
            (json!({"if": [true, "a", "b"]}), json!({}), json!("a")),
            (json!({"if": [false, "a", "b"]}), json!({}), json!("b")),
            (
                json!({"if": [false, "a", 0, "b", "c"]}),
                json!({}),
                json!("c"),
            ),
            (
                json!({"if": [false, "a", [1], "b", "c"]}),
                json!({}),
                json!("b"),
            ),
            (json!({"if": [false, "a"]}), json!({}), json!(null)),
            (json!({"if": []}), json!({}), json!(null)),
            (json!({"?:": [[], "a", "b"]}), json!({}), json!("b")),
            (json!({"and": [1, "x", 0, "y"]}), json!({}), json!(0)),
            (json!({"and": [1, "x"]}), json!({}), json!("x")),
            (json!({"or": [0, "", "z", "w"]}), json!({}), json!("z")),
            (json!({"or": [0, ""]}), json!({}), json!("")),
            (json!({"and": []}), json!({}), json!(null)),
            (
                json!({"if": [{"and": []}, "a", "b"]}),
                json!({}),
                json!("b"),
            ),
            (json!({"if": [{"or": []}, "a", "b"]}), json!({}), json!("b")),
            (json!({"if": [{"!": []}, "a", "b"]}), json!({}), json!("a")),
        ]);
    }

    #[test]
    fn equality_and_negation_follow_javascript() {
        check(&[
            (json!({"==": [1, "1"]}), json!({}), json!(true)),
            (json!({"==": [0, false]}), json!({}), json!(true)),
            (json!({"==": [null, 0]}), json!({}), json!(false)),
            (json!({"===": [1, "1"]}), json!({}), json!(false)),
            (json!({"===": ["a", "a"]}), json!({}), json!(true)),
            (json!({"!=": [1, "2"]}), json!({}), json!(true)),
            (json!({"!==": [1, 1]}), json!({}), json!(false)),
            (json!({"!": [[]]}), json!({}), json!(true)),
            (json!({"!": ""}), json!({}), json!(true)),
            (json!({"!!": ["0"]}), json!({}), json!(true)),
            (json!({"!!": [[]]}), json!({}), json!(false)),
            (json!({"!!": {"var": "o"}}), json!({"o": {}}), json!(true)),
        ]);
    }

    #[test]
    fn comparisons_coerce_and_support_between() {
        check(&[
            (json!({"<": [1, 2]}), json!({}), json!(true)),
            (json!({"<": ["11", "2"]}), json!({}), json!(true)),
            (json!({"<": ["11", 2]}), json!({}), json!(false)),
            (json!({"<": [1, 2, 3]}), json!({}), json!(true)),
            (json!({"<": [1, 3, 3]}), json!({}), json!(false)),
            (json!({"<=": [1, 3, 3]}), json!({}), json!(true)),
            (json!({"<=": [2, 2]}), json!({}), json!(true)),
            (json!({">": [3, 2]}), json!({}), json!(true)),
            (json!({">=": [2, "2"]}), json!({}), json!(true)),
            (json!({">": ["a", 1]}), json!({}), json!(false)),
            (json!({"<=": ["a", 1]}), json!({}), json!(false)),
            (json!({"<": [null, 1]}), json!({}), json!(true)),
            (json!({"<": [1]}), json!({}), json!(false)),
            (
                json!({">": [{"var": "age"}, 17]}),
                json!({"age": 18}),
                json!(true),
            ),
        ]);
    }

    #[test]
    fn arithmetic_follows_json_logic_js() {
        check(&[
            (json!({"+": [1, "2", 3.5]}), json!({}), json!(6.5)),
            (json!({"+": ["12px", 1]}), json!({}), json!(13)),
            (json!({"+": "5"}), json!({}), json!(5)),
            (json!({"+": []}), json!({}), json!(0)),
            (json!({"+": [true, 1]}), json!({}), json!(null)),
            (json!({"*": [2, "3"]}), json!({}), json!(6)),
            (json!({"*": ["7"]}), json!({}), json!("7")),
            (json!({"-": [5, "2"]}), json!({}), json!(3)),
            (json!({"-": [5]}), json!({}), json!(-5)),
            (json!({"-": [null, 1]}), json!({}), json!(-1)),
            (json!({"/": [7, 2]}), json!({}), json!(3.5)),
            (json!({"/": [1, 0]}), json!({}), json!(null)),
            (json!({"%": [-7, 3]}), json!({}), json!(-1)),
            (json!({"min": [3, "1", 2]}), json!({}), json!(1)),
            (json!({"max": [3, 1, 2]}), json!({}), json!(3)),
            (json!({"max": [3, "x"]}), json!({}), json!(null)),
            (json!({"min": []}), json!({}), json!(null)),
        ]);
    }

    #[test]
    fn strings_in_cat_and_substr() {
        check(&[
            (json!({"in": ["ell", "hello"]}), json!({}), json!(true)),
            (json!({"in": [1, "a1"]}), json!({}), json!(true)),
            (json!({"in": ["", ""]}), json!({}), json!(false)),
            (json!({"in": ["b", ["a", "b"]]}), json!({}), json!(true)),
            (json!({"in": [1, ["1"]]}), json!({}), json!(false)),
            (json!({"in": ["a", 5]}), json!({}), json!(false)),
            (
                json!({"in": [{"var": "c"}, ["NZ", "IE"]]}),
                json!({"c": "IE"}),
                json!(true),
            ),
            (
                json!({"cat": ["a", 1, null, true, [1, [2, 3]], 1.5]}),
                json!({}),
                json!("a1nulltrue1,2,31.5"),
            ),
            (
                json!({"substr": ["jsonlogic", 4]}),
                json!({}),
                json!("logic"),
            ),
            (
                json!({"substr": ["jsonlogic", -5]}),
                json!({}),
                json!("logic"),
            ),
            (
                json!({"substr": ["jsonlogic", 1, 3]}),
                json!({}),
                json!("son"),
            ),
            (
                json!({"substr": ["jsonlogic", 4, -2]}),
                json!({}),
                json!("log"),
            ),
            (json!({"substr": ["héllo", 1, 2]}), json!({}), json!("él")),
            (json!({"substr": ["abc", 1, null]}), json!({}), json!("")),
        ]);
    }

    #[test]
    fn array_operations_scope_var_to_the_element() {
        let data = json!({"xs": [1, 2, 3, 4], "users": [{"age": 30}, {"age": 12}]});
        check(&[
            (
                json!({"merge": [[1, 2], 3, [[4]]]}),
                json!({}),
                json!([1, 2, 3, [4]]),
            ),
            (
                json!({"map": [{"var": "xs"}, {"*": [{"var": ""}, 2]}]}),
                data.clone(),
                json!([2, 4, 6, 8]),
            ),
            (
                json!({"filter": [{"var": "xs"}, {">": [{"var": ""}, 2]}]}),
                data.clone(),
                json!([3, 4]),
            ),
            (
                json!({"reduce": [{"var": "xs"}, {"+": [{"var": "current"}, {"var": "accumulator"}]}, 10]}),
                data.clone(),
                json!(20),
            ),
            (
                json!({"reduce": [{"var": "nope"}, {"+": [1, 1]}, 7]}),
                data.clone(),
                json!(7),
            ),
            (
                json!({"all": [{"var": "xs"}, {">": [{"var": ""}, 0]}]}),
                data.clone(),
                json!(true),
            ),
            (json!({"all": [[], true]}), data.clone(), json!(false)),
            (
                json!({"some": [{"var": "users"}, {"<": [{"var": "age"}, 18]}]}),
                data.clone(),
                json!(true),
            ),
            (
                json!({"none": [{"var": "users"}, {">": [{"var": "age"}, 65]}]}),
                data.clone(),
                json!(true),
            ),
            (json!({"map": [5, 1]}), data, json!([])),
        ]);
    }

    #[test]
    fn starts_with_and_ends_with_need_two_strings() {
        check(&[
            (
                json!({"starts_with": [{"var": "email"}, "ann"]}),
                json!({"email": "ann@x.io"}),
                json!(true),
            ),
            (
                json!({"ends_with": [{"var": "email"}, "@x.io"]}),
                json!({"email": "ann@x.io"}),
                json!(true),
            ),
            (
                json!({"ends_with": [{"var": "email"}, "@y.io"]}),
                json!({"email": "ann@x.io"}),
                json!(false),
            ),
            (
                json!({"starts_with": [{"var": "n"}, "1"]}),
                json!({"n": 12}),
                json!(null),
            ),
            (json!({"starts_with": ["a"]}), json!({}), json!(null)),
            (
                json!({"ends_with": ["a", "a", "a"]}),
                json!({}),
                json!(null),
            ),
        ]);
    }

    #[test]
    fn sem_ver_compares_like_flagd() {
        let v = |ver: &str| json!({"v": ver});
        check(&[
            (
                json!({"sem_ver": [{"var": "v"}, ">=", "1.2.0"]}),
                v("1.10.0"),
                json!(true),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "<", "1.2.0"]}),
                v("v1.1.9"),
                json!(true),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "=", "1.2.3"]}),
                v("1.2.3+build"),
                json!(true),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "!=", "1.2.3"]}),
                v("1.2.3-rc.1"),
                json!(true),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, ">", "1.2"]}),
                v("1.2.1"),
                json!(true),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "<=", "2"]}),
                v("2.0.0"),
                json!(true),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "^", "1.0.0"]}),
                v("1.9.9"),
                json!(true),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "~", "1.2.0"]}),
                v("1.3.0"),
                json!(false),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, ">=", "1.2.0"]}),
                v("not-a-version"),
                json!(null),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "=>", "1.2.0"]}),
                v("1.2.0"),
                json!(null),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, ">=", "1.2.x"]}),
                v("1.2.0"),
                json!(null),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, {"cat": [">", "="]}, {"var": "t"}]}),
                json!({"v": "2.0.0", "t": "1.0.0"}),
                json!(true),
            ),
            (
                json!({"sem_ver": [{"var": "v"}, "^1.0.0"]}),
                v("1.0.0"),
                json!(null),
            ),
            (
                json!({"sem_ver": [{"var": "n"}, ">", 1.1]}),
                json!({"n": 1.2}),
                json!(true),
            ),
        ]);
    }

    /// Bucket assignments published in flagd's own evaluator tests (core/pkg/evaluator).
    #[test]
    fn fractional_matches_flagds_published_assignments() {
        let four = |bucket: Value| json!({"fractional": [bucket, ["red", 25], ["blue", 25], ["green", 25], ["yellow", 25]]});
        let by_flag_key = |email: &str| {
            let rule = four(json!({"cat": [{"var": "$flagd.flagKey"}, {"var": "email"}]}));
            let ctx = EvaluationContext::from_value(&json!({"email": email}), 0).unwrap();
            let compiled =
                Rule::compile(&rule, &IndexMap::new(), &CompileOptions::default()).unwrap();
            compiled.evaluate(&Env::new("headerColor", &ctx)).to_value()
        };
        assert_eq!(by_flag_key("rachel@faas.com"), json!("blue"));
        assert_eq!(by_flag_key("monica@faas.com"), json!("yellow"));
        assert_eq!(by_flag_key("joey@faas.com"), json!("red"));
        assert_eq!(by_flag_key("ross@faas.com"), json!("blue"));
        let seeded = four(json!({"cat": ["my-seed", {"var": "email"}]}));
        for (email, want) in [
            ("rachel@faas.com", "green"),
            ("monica@faas.com", "red"),
            ("joey@faas.com", "blue"),
            ("ross@faas.com", "green"),
        ] {
            assert_eq!(
                eval(seeded.clone(), json!({"email": email})),
                json!(want),
                "{email}"
            );
        }
        assert_eq!(
            eval(
                four(json!({"var": "email"})),
                json!({"email": "ross@faas.com"})
            ),
            json!("red")
        );
        assert_eq!(
            eval(
                json!({"fractional": ["email", ["red", 50], ["blue", 25], ["green", 25]]}),
                json!({"email": "test4@faas.com"})
            ),
            json!("green")
        );
        for rule in [
            json!({"fractional": [{"var": "email"}, ["red", 25], ["blue", 25]]}),
            json!({"fractional": [{"var": "email"}, ["red"], ["blue"]]}),
        ] {
            assert_eq!(eval(rule, json!({"email": "foo@foo.com"})), json!("blue"));
        }
    }

    #[test]
    fn fractional_defaults_to_flag_key_and_targeting_key() {
        let header = |rule: Value, data: Value| {
            let ctx = EvaluationContext::from_value(&data, 0).unwrap();
            let compiled =
                Rule::compile(&rule, &IndexMap::new(), &CompileOptions::default()).unwrap();
            compiled.evaluate(&Env::new("headerColor", &ctx)).to_value()
        };
        // flagd: "default to targetingKey if no bucket key provided" and "missing email".
        let tk = json!({"targetingKey": "foo@foo.com"});
        assert_eq!(
            header(
                json!({"fractional": [["blue", 50], ["green", 50]]}),
                tk.clone()
            ),
            json!("green")
        );
        assert_eq!(
            header(
                json!({"fractional": [{"var": "email"}, ["red", 50], ["blue", 50]]}),
                tk
            ),
            json!("blue")
        );
        for data in [
            json!({}),
            json!({"targetingKey": ""}),
            json!({"targetingKey": 5}),
        ] {
            assert_eq!(
                header(
                    json!({"fractional": [["blue", 50], ["green", 50]]}),
                    data.clone()
                ),
                json!(null),
                "{data}"
            );
        }
    }

    #[test]
    fn fractional_weights_can_be_expressions_and_variants_nested_rules() {
        let rule = json!({"fractional": [
            {"var": "id"},
            [{"if": [{"var": "beta"}, "new", "old"]}, {"*": [{"var": "pct"}, 1]}],
            ["control", {"-": [100, {"var": "pct"}]}]
        ]});
        // With 100% on the first arm, every user gets it.
        for id in ["a", "b", "c", "d"] {
            assert_eq!(
                eval(rule.clone(), json!({"id": id, "beta": true, "pct": 100})),
                json!("new")
            );
            assert_eq!(
                eval(rule.clone(), json!({"id": id, "beta": false, "pct": 100})),
                json!("old")
            );
            // A negative weight clamps to 0: 120% on the first arm gives -20 to control.
            assert_eq!(
                eval(rule.clone(), json!({"id": id, "beta": true, "pct": 120})),
                json!("new")
            );
            assert_eq!(
                eval(rule.clone(), json!({"id": id, "beta": true, "pct": 0})),
                json!("control")
            );
        }
        // Invalid input answers null.
        for bad in [
            json!({"fractional": [{"var": "id"}, ["a", 1.5]]}),
            json!({"fractional": [{"var": "id"}, ["a", "10"]]}),
            json!({"fractional": [{"var": "id"}, ["a", 2147483647], ["b", 1]]}),
            json!({"fractional": [{"var": "id"}, "a"]}),
            json!({"fractional": [{"var": "id"}]}),
            json!({"fractional": [5, ["a", 1]]}),
            json!({"fractional": "x"}),
        ] {
            assert_eq!(
                eval(bad.clone(), json!({"id": "u", "targetingKey": "t"})),
                json!(null),
                "{bad}"
            );
        }
    }

    #[test]
    fn fractional_v1_buckets_by_percentage() {
        // Independent check of the v1 arithmetic: hash → |i32| / i32::MAX * 100.
        let key = "flagu1";
        let hash = fractional::BucketKey::Given(key).hash();
        let pct = fractional::bucket_v1(hash);
        let want = if pct < 30.0 { "a" } else { "b" };
        let rule = json!({"fractional": [["a", 30], ["b", 70]]});
        assert_eq!(
            eval_with(rule, json!({"targetingKey": "u1"}), FractionalBucketing::V1),
            json!(want)
        );
    }
}
