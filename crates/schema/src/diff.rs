//! What changed between two schemas, and whether the release that runs
//! now (written for `before`) keeps working on `after`. Pure: no I/O.
//!
//! [`diff`] lists the changes; [`classify`] judges one: [`Compatibility::Safe`]
//! while the old release still runs, or [`Compatibility::Breaking`] with the
//! [`Rule`] it breaks and a sentence naming what the running release does
//! that will fail. The rules follow strong_migrations and squawk, seen from
//! the old code's side:
//!
//! - safe: a new table, schema, sequence, view, enum type or extension; a
//!   nullable column or one that fills itself (default, identity,
//!   generated); a new non-unique index; dropping NOT NULL; a new enum
//!   value; a constraint added `NOT VALID` (validated later); validating
//!   it; dropping an index or a constraint; a changed default; widening a
//!   `varchar` (or making it `text`);
//! - breaking: a dropped or renamed table, column, schema, sequence, view,
//!   enum type or extension; any other type change; NOT NULL added to a
//!   column, or a NOT NULL column added without a default; a default
//!   removed from a NOT NULL column; a new unique index, primary key,
//!   unique or exclusion constraint, or a validated foreign key or check,
//!   on an existing table (the old code's rows may violate it); an enum
//!   value removed; a changed view.
//!
//! Renames are guessed: in one table, exactly one dropped and one added
//! column of the same type is a rename; exactly one dropped and one added
//! table with the same columns (names and types) is a rename. A guess is
//! still breaking: the running release uses the old name.
//!
//! Constraints and indexes of a new (or renamed) table are part of that
//! table's change: a unique index on a new table breaks nothing.

use crate::model::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One difference between two schemas. Each carries what is needed to
/// explain it and to state its mirror image ([`Change::mirror`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    SchemaAdded {
        name: String,
    },
    SchemaDropped {
        name: String,
    },
    TableAdded {
        table: Table,
    },
    TableDropped {
        table: Table,
    },
    /// A table dropped and one added with the same columns.
    TableRenamed {
        from: Table,
        to: Table,
    },
    ColumnAdded {
        table: QualifiedName,
        column: Column,
    },
    ColumnDropped {
        table: QualifiedName,
        column: Column,
    },
    /// In one table, the only column dropped and the only one added, of
    /// the same type.
    ColumnRenamed {
        table: QualifiedName,
        from: Column,
        to: Column,
    },
    ColumnTypeChanged {
        table: QualifiedName,
        before: Column,
        after: Column,
    },
    ColumnSetNotNull {
        table: QualifiedName,
        before: Column,
        after: Column,
    },
    ColumnDropNotNull {
        table: QualifiedName,
        before: Column,
        after: Column,
    },
    DefaultChanged {
        table: QualifiedName,
        before: Column,
        after: Column,
    },
    IdentityChanged {
        table: QualifiedName,
        before: Column,
        after: Column,
    },
    GeneratedChanged {
        table: QualifiedName,
        before: Column,
        after: Column,
    },
    ConstraintAdded {
        table: QualifiedName,
        constraint: Constraint,
    },
    ConstraintDropped {
        table: QualifiedName,
        constraint: Constraint,
    },
    /// Same name, another definition or validation state.
    ConstraintChanged {
        table: QualifiedName,
        before: Constraint,
        after: Constraint,
    },
    IndexAdded {
        table: QualifiedName,
        index: Index,
    },
    IndexDropped {
        table: QualifiedName,
        index: Index,
    },
    IndexChanged {
        table: QualifiedName,
        before: Index,
        after: Index,
    },
    SequenceAdded {
        sequence: Sequence,
    },
    SequenceDropped {
        sequence: Sequence,
    },
    SequenceChanged {
        before: Sequence,
        after: Sequence,
    },
    ViewAdded {
        view: View,
    },
    ViewDropped {
        view: View,
    },
    ViewChanged {
        before: View,
        after: View,
    },
    EnumAdded {
        enum_type: EnumType,
    },
    EnumDropped {
        enum_type: EnumType,
    },
    EnumValueAdded {
        enum_name: QualifiedName,
        value: String,
    },
    EnumValueRemoved {
        enum_name: QualifiedName,
        value: String,
    },
    /// Same labels, another order.
    EnumValuesReordered {
        enum_name: QualifiedName,
        before: Vec<String>,
        after: Vec<String>,
    },
    ExtensionAdded {
        extension: Extension,
    },
    ExtensionDropped {
        extension: Extension,
    },
    ExtensionChanged {
        before: Extension,
        after: Extension,
    },
}

/// Whether the release that runs now keeps working after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Compatibility {
    Safe,
    Breaking {
        rule: Rule,
        /// What the running release does that fails now, naming the
        /// objects: "the running release reads and writes notes.title,
        /// which no longer exists".
        why: String,
    },
}

impl Compatibility {
    pub fn is_breaking(&self) -> bool {
        matches!(self, Compatibility::Breaking { .. })
    }
}

/// The rule a breaking change breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    SchemaDropped,
    TableDropped,
    TableRenamed,
    ColumnDropped,
    ColumnRenamed,
    ColumnTypeChanged,
    NotNullAdded,
    NotNullColumnWithoutDefault,
    DefaultRemoved,
    IdentityAlways,
    IdentityRemoved,
    GeneratedAdded,
    GeneratedRemoved,
    /// A unique index, primary key, unique or exclusion constraint on an
    /// existing table.
    UniquenessAdded,
    /// A validated foreign key or check (or a constraint trigger) on an
    /// existing table.
    ValidatedConstraintAdded,
    SequenceDropped,
    ViewDropped,
    ViewChanged,
    EnumDropped,
    EnumValueRemoved,
    ExtensionDropped,
}

impl fmt::Display for Change {
    /// One line for a report: "column notes.title renamed to headline".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Change::*;
        match self {
            SchemaAdded { name } => write!(f, "schema {name} added"),
            SchemaDropped { name } => write!(f, "schema {name} dropped"),
            TableAdded { table } => write!(f, "table {} added", table.name),
            TableDropped { table } => write!(f, "table {} dropped", table.name),
            TableRenamed { from, to } => write!(f, "table {} renamed to {}", from.name, to.name),
            ColumnAdded { table, column } => write!(
                f,
                "column {table}.{} added ({}{}{})",
                column.name,
                column.data_type,
                if column.nullable { ", nullable" } else { ", NOT NULL" },
                if column.fills_itself() { ", with a default" } else { "" }
            ),
            ColumnDropped { table, column } => write!(f, "column {table}.{} dropped", column.name),
            ColumnRenamed { table, from, to } => write!(f, "column {table}.{} renamed to {}", from.name, to.name),
            ColumnTypeChanged { table, before, after } => write!(
                f,
                "column {table}.{} changed type from {} to {}",
                before.name, before.data_type, after.data_type
            ),
            ColumnSetNotNull { table, after, .. } => write!(f, "column {table}.{} made NOT NULL", after.name),
            ColumnDropNotNull { table, after, .. } => write!(f, "column {table}.{} made nullable", after.name),
            DefaultChanged { table, before, after } => write!(
                f,
                "column {table}.{} default changed from {} to {}",
                after.name,
                before.default.as_deref().unwrap_or("none"),
                after.default.as_deref().unwrap_or("none")
            ),
            IdentityChanged { table, before, after } => write!(
                f,
                "column {table}.{} identity changed from {} to {}",
                after.name,
                identity_text(before.identity),
                identity_text(after.identity)
            ),
            GeneratedChanged { table, before, after } => write!(
                f,
                "column {table}.{} generation changed from {} to {}",
                after.name,
                before.generated.as_deref().unwrap_or("none"),
                after.generated.as_deref().unwrap_or("none")
            ),
            ConstraintAdded { table, constraint: c } => write!(
                f,
                "{} {} added to {table}: {}{}",
                c.kind.describe(),
                c.name,
                c.definition,
                if c.validated { "" } else { " (NOT VALID)" }
            ),
            ConstraintDropped { table, constraint: c } => {
                write!(f, "{} {} dropped from {table}", c.kind.describe(), c.name)
            }
            ConstraintChanged { table, before, after } => write!(
                f,
                "{} {} of {table} changed from {}{} to {}{}",
                after.kind.describe(),
                after.name,
                before.definition,
                if before.validated { "" } else { " (NOT VALID)" },
                after.definition,
                if after.validated { "" } else { " (NOT VALID)" }
            ),
            IndexAdded { table, index } => {
                write!(f, "{}index {} added to {table}", if index.unique { "unique " } else { "" }, index.name)
            }
            IndexDropped { table, index } => write!(f, "index {} dropped from {table}", index.name),
            IndexChanged { table, after, .. } => {
                write!(f, "index {} of {table} changed to {}", after.name, after.definition)
            }
            SequenceAdded { sequence } => write!(f, "sequence {} added", sequence.name),
            SequenceDropped { sequence } => write!(f, "sequence {} dropped", sequence.name),
            SequenceChanged { before, after } => {
                write!(f, "sequence {} changed type from {} to {}", after.name, before.data_type, after.data_type)
            }
            ViewAdded { view } => write!(f, "view {} added", view.name),
            ViewDropped { view } => write!(f, "view {} dropped", view.name),
            ViewChanged { after, .. } => write!(f, "view {} changed", after.name),
            EnumAdded { enum_type } => write!(f, "enum type {} added", enum_type.name),
            EnumDropped { enum_type } => write!(f, "enum type {} dropped", enum_type.name),
            EnumValueAdded { enum_name, value } => write!(f, "value {value:?} added to enum type {enum_name}"),
            EnumValueRemoved { enum_name, value } => {
                write!(f, "value {value:?} removed from enum type {enum_name}")
            }
            EnumValuesReordered { enum_name, .. } => write!(f, "values of enum type {enum_name} reordered"),
            ExtensionAdded { extension } => write!(f, "extension {} {} added", extension.name, extension.version),
            ExtensionDropped { extension } => write!(f, "extension {} dropped", extension.name),
            ExtensionChanged { before, after } => write!(
                f,
                "extension {} changed from {} (schema {}) to {} (schema {})",
                after.name, before.version, before.schema, after.version, after.schema
            ),
        }
    }
}

fn identity_text(i: Option<Identity>) -> &'static str {
    match i {
        None => "none",
        Some(Identity::Always) => "GENERATED ALWAYS",
        Some(Identity::ByDefault) => "GENERATED BY DEFAULT",
    }
}

impl Change {
    /// The same change seen from the other side: what
    /// `diff(after, before)` reports for it.
    pub fn mirror(self) -> Change {
        use Change::*;
        match self {
            SchemaAdded { name } => SchemaDropped { name },
            SchemaDropped { name } => SchemaAdded { name },
            TableAdded { table } => TableDropped { table },
            TableDropped { table } => TableAdded { table },
            TableRenamed { from, to } => TableRenamed { from: to, to: from },
            ColumnAdded { table, column } => ColumnDropped { table, column },
            ColumnDropped { table, column } => ColumnAdded { table, column },
            ColumnRenamed { table, from, to } => ColumnRenamed { table, from: to, to: from },
            ColumnTypeChanged { table, before, after } => ColumnTypeChanged { table, before: after, after: before },
            ColumnSetNotNull { table, before, after } => ColumnDropNotNull { table, before: after, after: before },
            ColumnDropNotNull { table, before, after } => ColumnSetNotNull { table, before: after, after: before },
            DefaultChanged { table, before, after } => DefaultChanged { table, before: after, after: before },
            IdentityChanged { table, before, after } => IdentityChanged { table, before: after, after: before },
            GeneratedChanged { table, before, after } => GeneratedChanged { table, before: after, after: before },
            ConstraintAdded { table, constraint } => ConstraintDropped { table, constraint },
            ConstraintDropped { table, constraint } => ConstraintAdded { table, constraint },
            ConstraintChanged { table, before, after } => ConstraintChanged { table, before: after, after: before },
            IndexAdded { table, index } => IndexDropped { table, index },
            IndexDropped { table, index } => IndexAdded { table, index },
            IndexChanged { table, before, after } => IndexChanged { table, before: after, after: before },
            SequenceAdded { sequence } => SequenceDropped { sequence },
            SequenceDropped { sequence } => SequenceAdded { sequence },
            SequenceChanged { before, after } => SequenceChanged { before: after, after: before },
            ViewAdded { view } => ViewDropped { view },
            ViewDropped { view } => ViewAdded { view },
            ViewChanged { before, after } => ViewChanged { before: after, after: before },
            EnumAdded { enum_type } => EnumDropped { enum_type },
            EnumDropped { enum_type } => EnumAdded { enum_type },
            EnumValueAdded { enum_name, value } => EnumValueRemoved { enum_name, value },
            EnumValueRemoved { enum_name, value } => EnumValueAdded { enum_name, value },
            EnumValuesReordered { enum_name, before, after } => {
                EnumValuesReordered { enum_name, before: after, after: before }
            }
            ExtensionAdded { extension } => ExtensionDropped { extension },
            ExtensionDropped { extension } => ExtensionAdded { extension },
            ExtensionChanged { before, after } => ExtensionChanged { before: after, after: before },
        }
    }
}

/// Every change from `before` to `after`, in a deterministic order
/// (schemas, tables by name and, inside a table, columns, constraints,
/// indexes; then sequences, views, enums, extensions).
pub fn diff(before: &Schema, after: &Schema) -> Vec<Change> {
    let mut out = Vec::new();
    let (b_schemas, a_schemas): (BTreeSet<&String>, BTreeSet<&String>) =
        (before.schemas.iter().collect(), after.schemas.iter().collect());
    for name in a_schemas.difference(&b_schemas) {
        out.push(Change::SchemaAdded { name: (*name).clone() });
    }
    for name in b_schemas.difference(&a_schemas) {
        out.push(Change::SchemaDropped { name: (*name).clone() });
    }

    diff_tables(before, after, &mut out);

    let keyed = |v: &[Sequence]| v.iter().map(|s| (s.name.clone(), s.clone())).collect::<BTreeMap<_, _>>();
    pair(
        keyed(&before.sequences),
        keyed(&after.sequences),
        &mut out,
        |sequence| Change::SequenceAdded { sequence },
        |sequence| Change::SequenceDropped { sequence },
        |b, a, out| {
            if b != a {
                out.push(Change::SequenceChanged { before: b, after: a })
            }
        },
    );
    let keyed = |v: &[View]| v.iter().map(|s| (s.name.clone(), s.clone())).collect::<BTreeMap<_, _>>();
    pair(
        keyed(&before.views),
        keyed(&after.views),
        &mut out,
        |view| Change::ViewAdded { view },
        |view| Change::ViewDropped { view },
        |b, a, out| {
            if b != a {
                out.push(Change::ViewChanged { before: b, after: a })
            }
        },
    );
    let keyed = |v: &[EnumType]| v.iter().map(|s| (s.name.clone(), s.clone())).collect::<BTreeMap<_, _>>();
    pair(
        keyed(&before.enums),
        keyed(&after.enums),
        &mut out,
        |enum_type| Change::EnumAdded { enum_type },
        |enum_type| Change::EnumDropped { enum_type },
        diff_enum,
    );
    let keyed = |v: &[Extension]| v.iter().map(|s| (s.name.clone(), s.clone())).collect::<BTreeMap<_, _>>();
    pair(
        keyed(&before.extensions),
        keyed(&after.extensions),
        &mut out,
        |extension| Change::ExtensionAdded { extension },
        |extension| Change::ExtensionDropped { extension },
        |b, a, out| {
            if b != a {
                out.push(Change::ExtensionChanged { before: b, after: a })
            }
        },
    );
    out
}

/// Walks two keyed maps: added, dropped, and the pairs present in both.
fn pair<K: Ord, V>(
    before: BTreeMap<K, V>,
    mut after: BTreeMap<K, V>,
    out: &mut Vec<Change>,
    added: impl Fn(V) -> Change,
    dropped: impl Fn(V) -> Change,
    both: impl Fn(V, V, &mut Vec<Change>),
) {
    let mut common = Vec::new();
    let mut gone = Vec::new();
    for (k, b) in before {
        match after.remove(&k) {
            Some(a) => common.push((b, a)),
            None => gone.push(b),
        }
    }
    for (_, a) in after {
        out.push(added(a));
    }
    for b in gone {
        out.push(dropped(b));
    }
    for (b, a) in common {
        both(b, a, out);
    }
}

fn diff_enum(b: EnumType, a: EnumType, out: &mut Vec<Change>) {
    let name = a.name.clone();
    let (bl, al): (BTreeSet<&String>, BTreeSet<&String>) = (b.labels.iter().collect(), a.labels.iter().collect());
    for v in a.labels.iter().filter(|l| !bl.contains(l)) {
        out.push(Change::EnumValueAdded { enum_name: name.clone(), value: v.clone() });
    }
    for v in b.labels.iter().filter(|l| !al.contains(l)) {
        out.push(Change::EnumValueRemoved { enum_name: name.clone(), value: v.clone() });
    }
    // Order of the labels both have.
    let kept_b: Vec<&String> = b.labels.iter().filter(|l| al.contains(l)).collect();
    let kept_a: Vec<&String> = a.labels.iter().filter(|l| bl.contains(l)).collect();
    if kept_b != kept_a {
        out.push(Change::EnumValuesReordered {
            enum_name: name,
            before: kept_b.into_iter().cloned().collect(),
            after: kept_a.into_iter().cloned().collect(),
        });
    }
}

/// The columns (names and types) of a table: what a renamed table keeps.
fn signature(t: &Table) -> Vec<(&str, &str)> {
    let mut s: Vec<(&str, &str)> = t.columns.iter().map(|c| (c.name.as_str(), c.data_type.as_str())).collect();
    s.sort();
    s
}

fn diff_tables(before: &Schema, after: &Schema, out: &mut Vec<Change>) {
    let b: BTreeMap<&QualifiedName, &Table> = before.tables.iter().map(|t| (&t.name, t)).collect();
    let a: BTreeMap<&QualifiedName, &Table> = after.tables.iter().map(|t| (&t.name, t)).collect();
    let added: Vec<&Table> = a.iter().filter(|(k, _)| !b.contains_key(*k)).map(|(_, t)| *t).collect();
    let dropped: Vec<&Table> = b.iter().filter(|(k, _)| !a.contains_key(*k)).map(|(_, t)| *t).collect();

    // Renames: a dropped table whose columns exactly one added table has,
    // and that added table matching no other dropped one. (Symmetric, so
    // that diff(b, a) mirrors diff(a, b).)
    let mut renamed: Vec<(&Table, &Table)> = Vec::new();
    for d in &dropped {
        let sig = signature(d);
        if sig.is_empty() {
            continue;
        }
        let candidates: Vec<&&Table> = added.iter().filter(|t| signature(t) == sig).collect();
        if let [only] = candidates.as_slice() {
            let back = dropped.iter().filter(|t| signature(t) == sig).count();
            if back == 1 {
                renamed.push((d, only));
            }
        }
    }
    for t in &added {
        if !renamed.iter().any(|(_, to)| to.name == t.name) {
            out.push(Change::TableAdded { table: (*t).clone() });
        }
    }
    for t in &dropped {
        if !renamed.iter().any(|(from, _)| from.name == t.name) {
            out.push(Change::TableDropped { table: (*t).clone() });
        }
    }
    for (from, to) in renamed {
        out.push(Change::TableRenamed { from: from.clone(), to: to.clone() });
    }
    for (name, bt) in &b {
        if let Some(at) = a.get(name) {
            diff_table(bt, at, out);
        }
    }
}

fn diff_table(b: &Table, a: &Table, out: &mut Vec<Change>) {
    let table = a.name.clone();
    let added: Vec<&Column> = a.columns.iter().filter(|c| b.column(&c.name).is_none()).collect();
    let dropped: Vec<&Column> = b.columns.iter().filter(|c| a.column(&c.name).is_none()).collect();
    match (added.as_slice(), dropped.as_slice()) {
        ([to], [from]) if to.data_type == from.data_type => {
            out.push(Change::ColumnRenamed { table: table.clone(), from: (*from).clone(), to: (*to).clone() })
        }
        _ => {
            for c in added {
                out.push(Change::ColumnAdded { table: table.clone(), column: c.clone() });
            }
            for c in dropped {
                out.push(Change::ColumnDropped { table: table.clone(), column: c.clone() });
            }
        }
    }
    for bc in &b.columns {
        let Some(ac) = a.column(&bc.name) else { continue };
        let (before, after) = (bc.clone(), ac.clone());
        let t = || table.clone();
        if bc.data_type != ac.data_type {
            out.push(Change::ColumnTypeChanged { table: t(), before: before.clone(), after: after.clone() });
        }
        if bc.nullable && !ac.nullable {
            out.push(Change::ColumnSetNotNull { table: t(), before: before.clone(), after: after.clone() });
        }
        if !bc.nullable && ac.nullable {
            out.push(Change::ColumnDropNotNull { table: t(), before: before.clone(), after: after.clone() });
        }
        if bc.default != ac.default {
            out.push(Change::DefaultChanged { table: t(), before: before.clone(), after: after.clone() });
        }
        if bc.identity != ac.identity {
            out.push(Change::IdentityChanged { table: t(), before: before.clone(), after: after.clone() });
        }
        if bc.generated != ac.generated {
            out.push(Change::GeneratedChanged { table: t(), before, after });
        }
    }

    let keyed = |v: &[Constraint]| v.iter().map(|c| (c.name.clone(), c.clone())).collect::<BTreeMap<_, _>>();
    let t1 = table.clone();
    let t2 = table.clone();
    let t3 = table.clone();
    pair(
        keyed(&b.constraints),
        keyed(&a.constraints),
        out,
        move |constraint| Change::ConstraintAdded { table: t1.clone(), constraint },
        move |constraint| Change::ConstraintDropped { table: t2.clone(), constraint },
        move |before, after, out| {
            if before != after {
                out.push(Change::ConstraintChanged { table: t3.clone(), before, after })
            }
        },
    );
    let keyed = |v: &[Index]| v.iter().map(|c| (c.name.clone(), c.clone())).collect::<BTreeMap<_, _>>();
    let t1 = table.clone();
    let t2 = table.clone();
    let t3 = table;
    pair(
        keyed(&b.indexes),
        keyed(&a.indexes),
        out,
        move |index| Change::IndexAdded { table: t1.clone(), index },
        move |index| Change::IndexDropped { table: t2.clone(), index },
        move |before, after, out| {
            if before != after {
                out.push(Change::IndexChanged { table: t3.clone(), before, after })
            }
        },
    );
}

/// Is a type change one the old code cannot notice: a `varchar` that
/// gets longer, loses its limit, or becomes `text`?
fn widens(from: &str, to: &str) -> bool {
    fn varchar_len(t: &str) -> Option<Option<u32>> {
        if t == "character varying" {
            return Some(None);
        }
        let n = t.strip_prefix("character varying(")?.strip_suffix(')')?;
        n.parse().ok().map(Some)
    }
    match (varchar_len(from), varchar_len(to)) {
        (Some(_), None) => to == "text",
        (Some(Some(a)), Some(Some(b))) => b >= a,
        (Some(_), Some(None)) => true,
        _ => false,
    }
}

fn breaking(rule: Rule, why: String) -> Compatibility {
    Compatibility::Breaking { rule, why }
}

/// Whether the release that runs now keeps working after `change`.
/// Total: every change gets a verdict.
pub fn classify(change: &Change) -> Compatibility {
    use Change::*;
    use Compatibility::Safe;
    match change {
        SchemaAdded { .. }
        | TableAdded { .. }
        | SequenceAdded { .. }
        | ViewAdded { .. }
        | EnumAdded { .. }
        | EnumValueAdded { .. }
        | EnumValuesReordered { .. }
        | ExtensionAdded { .. }
        | ExtensionChanged { .. }
        | SequenceChanged { .. }
        | ColumnDropNotNull { .. }
        | ConstraintDropped { .. }
        | IndexDropped { .. } => Safe,
        SchemaDropped { name } => breaking(
            Rule::SchemaDropped,
            format!("the running release may use objects in schema {name}, which no longer exists"),
        ),
        TableDropped { table } => breaking(
            Rule::TableDropped,
            format!("the running release reads and writes table {}, which no longer exists", table.name),
        ),
        TableRenamed { from, to } => breaking(
            Rule::TableRenamed,
            format!(
                "table {} is now {}: the running release still reads and writes {}, which no longer exists",
                from.name, to.name, from.name
            ),
        ),
        ColumnAdded { table, column } => {
            if column.nullable || column.fills_itself() {
                Safe
            } else {
                breaking(
                    Rule::NotNullColumnWithoutDefault,
                    format!(
                        "the running release inserts into {table} without {}, which is NOT NULL without a default: its inserts fail",
                        column.name
                    ),
                )
            }
        }
        ColumnDropped { table, column } => breaking(
            Rule::ColumnDropped,
            format!("the running release reads and writes {table}.{}, which no longer exists", column.name),
        ),
        ColumnRenamed { table, from, to } => breaking(
            Rule::ColumnRenamed,
            format!(
                "{table}.{} is renamed to {}: the running release still reads and writes {table}.{}, which no longer exists",
                from.name, to.name, from.name
            ),
        ),
        ColumnTypeChanged { table, before, after } => {
            if widens(&before.data_type, &after.data_type) {
                Safe
            } else {
                breaking(
                    Rule::ColumnTypeChanged,
                    format!(
                        "the running release reads and writes {table}.{} as {}, and it is now {}",
                        after.name, before.data_type, after.data_type
                    ),
                )
            }
        }
        ColumnSetNotNull { table, after, .. } => breaking(
            Rule::NotNullAdded,
            format!("the running release may write NULL into {table}.{}, which is now NOT NULL", after.name),
        ),
        DefaultChanged { table, before, after } => {
            if before.default.is_some()
                && after.default.is_none()
                && !after.nullable
                && after.identity.is_none()
                && after.generated.is_none()
            {
                breaking(
                    Rule::DefaultRemoved,
                    format!(
                        "the running release may insert into {table} without {}, whose default is gone while it stays NOT NULL",
                        after.name
                    ),
                )
            } else {
                Safe
            }
        }
        IdentityChanged { table, before, after } => match (before.identity, after.identity) {
            (b, Some(Identity::Always)) if b != Some(Identity::Always) => breaking(
                Rule::IdentityAlways,
                format!(
                    "{table}.{} is now GENERATED ALWAYS AS IDENTITY: an insert of the running release that gives it a value fails",
                    after.name
                ),
            ),
            (Some(_), None) if !after.nullable && after.default.is_none() && after.generated.is_none() => breaking(
                Rule::IdentityRemoved,
                format!(
                    "the running release inserts into {table} without {}, which no longer numbers itself and is NOT NULL",
                    after.name
                ),
            ),
            _ => Safe,
        },
        GeneratedChanged { table, before, after } => match (&before.generated, &after.generated) {
            (None, Some(_)) => breaking(
                Rule::GeneratedAdded,
                format!(
                    "{table}.{} is now a generated column: the running release's writes to it fail",
                    after.name
                ),
            ),
            (Some(_), None) if !after.nullable && after.default.is_none() && after.identity.is_none() => breaking(
                Rule::GeneratedRemoved,
                format!(
                    "the running release never writes {table}.{}, which is no longer generated and is NOT NULL: its inserts fail",
                    after.name
                ),
            ),
            _ => Safe,
        },
        ConstraintAdded { table, constraint } => constraint_added(table, constraint),
        ConstraintChanged { table, before, after } => {
            if before.kind == after.kind && before.definition == after.definition {
                // Validated (or marked NOT VALID again): rows written
                // since it was added were checked already.
                Safe
            } else {
                constraint_added(table, after)
            }
        }
        IndexAdded { table, index } => index_added(table, index),
        IndexChanged { table, before, after } => {
            if after.unique && !before.unique {
                index_added(table, after)
            } else {
                Safe
            }
        }
        SequenceDropped { sequence } => breaking(
            Rule::SequenceDropped,
            format!("the running release may take values from sequence {}, which no longer exists", sequence.name),
        ),
        ViewDropped { view } => breaking(
            Rule::ViewDropped,
            format!("the running release may read view {}, which no longer exists", view.name),
        ),
        ViewChanged { after, .. } => breaking(
            Rule::ViewChanged,
            format!(
                "view {} has a new definition: the running release may read columns it no longer has",
                after.name
            ),
        ),
        EnumDropped { enum_type } => breaking(
            Rule::EnumDropped,
            format!("the running release may use enum type {}, which no longer exists", enum_type.name),
        ),
        EnumValueRemoved { enum_name, value } => breaking(
            Rule::EnumValueRemoved,
            format!("the running release may write {value:?} into enum type {enum_name}, which no longer has it"),
        ),
        ExtensionDropped { extension } => breaking(
            Rule::ExtensionDropped,
            format!("the running release may use extension {}, which is no longer installed", extension.name),
        ),
    }
}

fn constraint_added(table: &QualifiedName, c: &Constraint) -> Compatibility {
    match c.kind {
        ConstraintKind::PrimaryKey | ConstraintKind::Unique | ConstraintKind::Exclusion => breaking(
            Rule::UniquenessAdded,
            format!(
                "{} {} ({}) on the existing table {table}: rows the running release writes may violate it and fail",
                c.kind.describe(),
                c.name,
                c.definition
            ),
        ),
        ConstraintKind::ForeignKey | ConstraintKind::Check if !c.validated => Compatibility::Safe,
        ConstraintKind::ForeignKey | ConstraintKind::Check | ConstraintKind::Trigger => breaking(
            Rule::ValidatedConstraintAdded,
            format!(
                "{} {} ({}) on the existing table {table}: rows the running release writes may violate it and fail (add it NOT VALID and validate it in a later release)",
                c.kind.describe(),
                c.name,
                c.definition
            ),
        ),
    }
}

fn index_added(table: &QualifiedName, index: &Index) -> Compatibility {
    if index.unique {
        breaking(
            Rule::UniquenessAdded,
            format!(
                "unique index {} on the existing table {table}: rows the running release writes may violate it and fail",
                index.name
            ),
        )
    } else {
        Compatibility::Safe
    }
}

/// A change with its verdict: a line of the gate's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Classified {
    /// One line: "column notes.title renamed to headline".
    pub summary: String,
    pub change: Change,
    pub compatibility: Compatibility,
}

/// [`diff`], each change with its [`classify`] verdict.
pub fn classified(before: &Schema, after: &Schema) -> Vec<Classified> {
    diff(before, after)
        .into_iter()
        .map(|change| Classified { summary: change.to_string(), compatibility: classify(&change), change })
        .collect()
}

/// What code written for `expected` meets on `actual`: the breaking
/// changes from one to the other. For a rollback: `expected` is the
/// schema stored with the release rolled back to (its
/// [`crate::GateReport::after`]), `actual` the database's schema now
/// ([`crate::read_schema`]); an empty result means its code still fits.
pub fn breaking_for(expected: &Schema, actual: &Schema) -> Vec<Classified> {
    classified(expected, actual).into_iter().filter(|c| c.compatibility.is_breaking()).collect()
}
