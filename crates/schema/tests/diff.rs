//! The pure diff and its classification: examples of each rule, and
//! property tests over random schemas.

use nonstop_schema::diff::{classified, classify, diff, Change, Compatibility, Rule};
use nonstop_schema::model::*;
use proptest::prelude::*;

fn col(name: &str, ty: &str, nullable: bool, default: Option<&str>) -> Column {
    Column {
        name: name.into(),
        data_type: ty.into(),
        nullable,
        default: default.map(str::to_string),
        identity: None,
        generated: None,
    }
}

fn notes(columns: Vec<Column>) -> Table {
    Table {
        name: QualifiedName::new("public", "notes"),
        columns,
        constraints: vec![Constraint {
            name: "notes_pkey".into(),
            kind: ConstraintKind::PrimaryKey,
            definition: "PRIMARY KEY (id)".into(),
            validated: true,
        }],
        indexes: vec![],
    }
}

fn base() -> Schema {
    Schema {
        schemas: vec!["public".into()],
        tables: vec![notes(vec![
            col("id", "bigint", false, None),
            col("title", "character varying(200)", false, None),
            col("body", "text", true, None),
        ])],
        ..Default::default()
    }
    .normalized()
}

fn with_notes(f: impl FnOnce(&mut Table)) -> Schema {
    let mut s = base();
    f(&mut s.tables[0]);
    s.normalized()
}

fn only(before: &Schema, after: &Schema) -> (Change, Compatibility) {
    let changes = diff(before, after);
    assert_eq!(changes.len(), 1, "{changes:#?}");
    let c = changes.into_iter().next().unwrap();
    let v = classify(&c);
    (c, v)
}

fn rule(v: &Compatibility) -> Option<Rule> {
    match v {
        Compatibility::Safe => None,
        Compatibility::Breaking { rule, .. } => Some(*rule),
    }
}

#[test]
fn a_renamed_column_is_breaking_and_named() {
    let after = with_notes(|t| t.columns[2].name = "headline".into()); // title (sorted: body, id, title)
    let (change, verdict) = only(&base(), &after);
    assert!(matches!(&change, Change::ColumnRenamed { from, to, .. } if from.name == "title" && to.name == "headline"));
    assert_eq!(change.to_string(), "column notes.title renamed to headline");
    let Compatibility::Breaking { rule, why } = verdict else { panic!("safe?") };
    assert_eq!(rule, Rule::ColumnRenamed);
    assert!(why.contains("notes.title") && why.contains("no longer exists"), "{why}");
}

#[test]
fn safe_changes_are_safe() {
    let cases: Vec<(&str, Schema)> = vec![
        ("nullable column", with_notes(|t| t.columns.push(col("subtitle", "text", true, None)))),
        ("column with default", with_notes(|t| t.columns.push(col("n", "integer", false, Some("0"))))),
        ("drop not null", with_notes(|t| t.columns[2].nullable = true)),
        ("varchar widened", with_notes(|t| t.columns[2].data_type = "character varying(400)".into())),
        ("varchar to text", with_notes(|t| t.columns[2].data_type = "text".into())),
        (
            "non-unique index",
            with_notes(|t| {
                t.indexes.push(Index {
                    name: "notes_title".into(),
                    definition: "CREATE INDEX ...".into(),
                    unique: false,
                })
            }),
        ),
        (
            "foreign key NOT VALID",
            with_notes(|t| {
                t.constraints.push(Constraint {
                    name: "fk".into(),
                    kind: ConstraintKind::ForeignKey,
                    definition: "FOREIGN KEY (x) REFERENCES y(id) NOT VALID".into(),
                    validated: false,
                })
            }),
        ),
        ("new table", {
            let mut s = base();
            s.tables.push(Table {
                name: QualifiedName::new("public", "tags"),
                columns: vec![col("id", "bigint", false, None)],
                constraints: vec![Constraint {
                    name: "tags_name_key".into(),
                    kind: ConstraintKind::Unique,
                    definition: "UNIQUE (name)".into(),
                    validated: true,
                }],
                indexes: vec![],
            });
            s.normalized()
        }),
    ];
    for (what, after) in cases {
        let (change, verdict) = only(&base(), &after);
        assert_eq!(verdict, Compatibility::Safe, "{what}: {change}");
    }
}

#[test]
fn breaking_changes_are_breaking_with_their_rule() {
    let cases: Vec<(Rule, Schema)> = vec![
        (
            Rule::ColumnDropped,
            with_notes(|t| {
                t.columns.remove(0);
            }),
        ),
        (Rule::ColumnTypeChanged, with_notes(|t| t.columns[2].data_type = "character varying(100)".into())),
        (Rule::ColumnTypeChanged, with_notes(|t| t.columns[1].data_type = "integer".into())),
        (Rule::NotNullAdded, with_notes(|t| t.columns[0].nullable = false)),
        (Rule::NotNullColumnWithoutDefault, with_notes(|t| t.columns.push(col("n", "integer", false, None)))),
        (
            Rule::UniquenessAdded,
            with_notes(|t| {
                t.indexes.push(Index { name: "u".into(), definition: "CREATE UNIQUE INDEX u ...".into(), unique: true })
            }),
        ),
        (
            Rule::UniquenessAdded,
            with_notes(|t| {
                t.constraints.push(Constraint {
                    name: "notes_title_key".into(),
                    kind: ConstraintKind::Unique,
                    definition: "UNIQUE (title)".into(),
                    validated: true,
                })
            }),
        ),
        (
            Rule::ValidatedConstraintAdded,
            with_notes(|t| {
                t.constraints.push(Constraint {
                    name: "c".into(),
                    kind: ConstraintKind::Check,
                    definition: "CHECK ((length(title) > 0))".into(),
                    validated: true,
                })
            }),
        ),
        (Rule::TableDropped, Schema { schemas: vec!["public".into()], ..Default::default() }),
    ];
    for (expected, after) in cases {
        let (change, verdict) = only(&base(), &after);
        assert_eq!(rule(&verdict), Some(expected), "{change}");
    }
}

#[test]
fn a_renamed_table_is_breaking() {
    let mut after = base();
    after.tables[0].name = QualifiedName::new("public", "posts");
    let (change, verdict) = only(&base(), &after);
    assert_eq!(change.to_string(), "table notes renamed to posts");
    assert_eq!(rule(&verdict), Some(Rule::TableRenamed));
}

#[test]
fn enum_values_added_are_safe_and_removed_are_breaking() {
    let e = |labels: &[&str]| Schema {
        enums: vec![EnumType {
            name: QualifiedName::new("public", "mood"),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }],
        ..Default::default()
    };
    let (_, v) = only(&e(&["sad", "ok"]), &e(&["sad", "ok", "happy"]));
    assert_eq!(v, Compatibility::Safe);
    let (c, v) = only(&e(&["sad", "ok", "happy"]), &e(&["sad", "happy"]));
    assert_eq!(rule(&v), Some(Rule::EnumValueRemoved), "{c}");
}

#[test]
fn validating_a_not_valid_constraint_is_safe() {
    let fk = |validated| {
        with_notes(|t| {
            t.constraints.push(Constraint {
                name: "fk".into(),
                kind: ConstraintKind::ForeignKey,
                definition: "FOREIGN KEY (x) REFERENCES y(id)".into(),
                validated,
            })
        })
    };
    let (c, v) = only(&fk(false), &fk(true));
    assert!(matches!(c, Change::ConstraintChanged { .. }));
    assert_eq!(v, Compatibility::Safe);
}

#[test]
fn a_rollback_behind_the_schema_is_named() {
    // v1's code expects `title`; v2's migration renamed it.
    let v1 = base();
    let now = with_notes(|t| t.columns[2].name = "headline".into());
    let found = nonstop_schema::breaking_for(&v1, &now);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].summary, "column notes.title renamed to headline");
    // A column v2 added (nullable) does not stop v1.
    let now = with_notes(|t| t.columns.push(col("subtitle", "text", true, None)));
    assert!(nonstop_schema::breaking_for(&v1, &now).is_empty());
}

// ---- property tests ----

const TYPES: [&str; 6] = ["integer", "bigint", "text", "boolean", "character varying(20)", "character varying(40)"];

fn column(name: String) -> impl Strategy<Value = Column> {
    (
        proptest::sample::select(TYPES.to_vec()),
        any::<bool>(),
        proptest::option::weighted(0.3, proptest::sample::select(vec!["0", "'x'::text", "now()"])),
        proptest::option::weighted(0.1, prop_oneof![Just(Identity::Always), Just(Identity::ByDefault)]),
        proptest::option::weighted(0.1, Just("(1 + 1)".to_string())),
    )
        .prop_map(move |(ty, nullable, default, identity, generated)| Column {
            name: name.clone(),
            data_type: ty.to_string(),
            nullable,
            default: default.map(str::to_string),
            identity,
            generated,
        })
}

fn kind() -> impl Strategy<Value = ConstraintKind> {
    proptest::sample::select(vec![
        ConstraintKind::PrimaryKey,
        ConstraintKind::Unique,
        ConstraintKind::ForeignKey,
        ConstraintKind::Check,
        ConstraintKind::Exclusion,
        ConstraintKind::Trigger,
    ])
}

fn table(name: QualifiedName) -> impl Strategy<Value = Table> {
    let columns = proptest::sample::subsequence((0..6).map(|i| format!("c{i}")).collect::<Vec<_>>(), 0..6)
        .prop_flat_map(|names| names.into_iter().map(column).collect::<Vec<_>>());
    let constraints = proptest::collection::btree_map(
        proptest::sample::select(vec!["k0", "k1", "k2"]),
        (kind(), proptest::sample::select(vec!["A", "B"]), any::<bool>()),
        0..3,
    );
    let indexes = proptest::collection::btree_map(
        proptest::sample::select(vec!["i0", "i1", "i2"]),
        (proptest::sample::select(vec!["CREATE INDEX a", "CREATE INDEX b"]), any::<bool>()),
        0..3,
    );
    (columns, constraints, indexes).prop_map(move |(columns, constraints, indexes)| Table {
        name: name.clone(),
        columns,
        constraints: constraints
            .into_iter()
            .map(|(n, (kind, def, validated))| Constraint { name: n.into(), kind, definition: def.into(), validated })
            .collect(),
        indexes: indexes
            .into_iter()
            .map(|(n, (def, unique))| Index { name: n.into(), definition: def.into(), unique })
            .collect(),
    })
}

fn qname() -> impl Strategy<Value = QualifiedName> {
    (proptest::sample::select(vec!["public", "app"]), proptest::sample::select(vec!["t0", "t1", "t2", "t3"]))
        .prop_map(|(s, n)| QualifiedName::new(s, n))
}

fn schema() -> impl Strategy<Value = Schema> {
    let tables = proptest::sample::subsequence(
        ["public", "app"]
            .iter()
            .flat_map(|s| (0..4).map(move |i| QualifiedName::new(*s, format!("t{i}"))))
            .collect::<Vec<_>>(),
        0..5,
    )
    .prop_flat_map(|names| names.into_iter().map(table).collect::<Vec<_>>());
    let labels = proptest::sample::subsequence(vec!["a", "b", "c", "d"], 0..4).prop_shuffle();
    let enums = proptest::collection::btree_map(qname(), labels, 0..3);
    let sequences = proptest::collection::btree_map(qname(), proptest::sample::select(vec!["bigint", "integer"]), 0..3);
    let views = proptest::collection::btree_map(
        qname(),
        (any::<bool>(), proptest::sample::select(vec!["SELECT 1", "SELECT 2"])),
        0..2,
    );
    let extensions = proptest::collection::btree_map(
        proptest::sample::select(vec!["hstore", "citext", "pg_trgm"]),
        proptest::sample::select(vec!["1.0", "1.1"]),
        0..3,
    );
    let schemas = proptest::sample::subsequence(vec!["public", "app", "audit"], 0..3);
    (tables, enums, sequences, views, extensions, schemas).prop_map(
        |(tables, enums, sequences, views, extensions, schemas)| {
            Schema {
                schemas: schemas.into_iter().map(str::to_string).collect(),
                tables,
                sequences: sequences.into_iter().map(|(name, t)| Sequence { name, data_type: t.into() }).collect(),
                views: views
                    .into_iter()
                    .map(|(name, (materialized, d))| View { name, materialized, definition: d.into() })
                    .collect(),
                enums: enums
                    .into_iter()
                    .map(|(name, labels)| EnumType { name, labels: labels.into_iter().map(str::to_string).collect() })
                    .collect(),
                extensions: extensions
                    .into_iter()
                    .map(|(name, version)| Extension {
                        name: name.into(),
                        version: version.into(),
                        schema: "public".into(),
                    })
                    .collect(),
            }
            .normalized()
        },
    )
}

fn sorted(mut changes: Vec<Change>) -> Vec<String> {
    let mut out: Vec<String> = changes.drain(..).map(|c| serde_json::to_string(&c).unwrap()).collect();
    out.sort();
    out
}

/// Safe additions to a schema: new tables, nullable columns or columns
/// with a default, non-unique indexes, dropped NOT NULL, appended enum
/// values, new enums, sequences, views, extensions and schemas.
#[derive(Debug, Clone)]
enum SafeEdit {
    Table(u8),
    NullableColumn(u8, u8),
    DefaultColumn(u8, u8),
    Index(u8, u8),
    DropNotNull(u8, u8),
    EnumValue(u8, u8),
    Enum(u8),
    Sequence(u8),
    View(u8),
    Extension(u8),
    Schema(u8),
}

fn safe_edit() -> impl Strategy<Value = SafeEdit> {
    prop_oneof![
        any::<u8>().prop_map(SafeEdit::Table),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| SafeEdit::NullableColumn(a, b)),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| SafeEdit::DefaultColumn(a, b)),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| SafeEdit::Index(a, b)),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| SafeEdit::DropNotNull(a, b)),
        (any::<u8>(), any::<u8>()).prop_map(|(a, b)| SafeEdit::EnumValue(a, b)),
        any::<u8>().prop_map(SafeEdit::Enum),
        any::<u8>().prop_map(SafeEdit::Sequence),
        any::<u8>().prop_map(SafeEdit::View),
        any::<u8>().prop_map(SafeEdit::Extension),
        any::<u8>().prop_map(SafeEdit::Schema),
    ]
}

fn apply(s: &mut Schema, edit: &SafeEdit) {
    let pick = |n: usize, i: u8| (n > 0).then(|| i as usize % n);
    match *edit {
        SafeEdit::Table(i) => {
            let name = QualifiedName::new("public", format!("new{i}"));
            if s.table(&name).is_none() {
                s.tables.push(Table {
                    name,
                    columns: vec![col("id", "bigint", false, None), col(&format!("x{i}"), "text", false, None)],
                    constraints: vec![Constraint {
                        name: format!("new{i}_key"),
                        kind: ConstraintKind::Unique,
                        definition: "UNIQUE (id)".into(),
                        validated: true,
                    }],
                    indexes: vec![Index {
                        name: format!("new{i}_u"),
                        definition: "CREATE UNIQUE INDEX".into(),
                        unique: true,
                    }],
                });
            }
        }
        SafeEdit::NullableColumn(t, c) | SafeEdit::DefaultColumn(t, c) => {
            if let Some(t) = pick(s.tables.len(), t) {
                let name = format!("added{c}");
                if s.tables[t].column(&name).is_none() {
                    let column = match edit {
                        SafeEdit::NullableColumn(..) => col(&name, "text", true, None),
                        _ => col(&name, "integer", false, Some("0")),
                    };
                    s.tables[t].columns.push(column);
                }
            }
        }
        SafeEdit::Index(t, i) => {
            if let Some(t) = pick(s.tables.len(), t) {
                let name = format!("added_idx{i}");
                if !s.tables[t].indexes.iter().any(|x| x.name == name) {
                    s.tables[t].indexes.push(Index { name, definition: "CREATE INDEX added".into(), unique: false });
                }
            }
        }
        SafeEdit::DropNotNull(t, c) => {
            if let Some(t) = pick(s.tables.len(), t) {
                if let Some(c) = pick(s.tables[t].columns.len(), c) {
                    s.tables[t].columns[c].nullable = true;
                }
            }
        }
        SafeEdit::EnumValue(e, v) => {
            if let Some(e) = pick(s.enums.len(), e) {
                let label = format!("new{v}");
                if !s.enums[e].labels.contains(&label) {
                    s.enums[e].labels.push(label);
                }
            }
        }
        SafeEdit::Enum(i) => {
            let name = QualifiedName::new("public", format!("new_enum{i}"));
            if !s.enums.iter().any(|e| e.name == name) {
                s.enums.push(EnumType { name, labels: vec!["a".into()] });
            }
        }
        SafeEdit::Sequence(i) => {
            let name = QualifiedName::new("public", format!("new_seq{i}"));
            if !s.sequences.iter().any(|e| e.name == name) {
                s.sequences.push(Sequence { name, data_type: "bigint".into() });
            }
        }
        SafeEdit::View(i) => {
            let name = QualifiedName::new("public", format!("new_view{i}"));
            if !s.views.iter().any(|e| e.name == name) {
                s.views.push(View { name, materialized: false, definition: "SELECT 1".into() });
            }
        }
        SafeEdit::Extension(i) => {
            let name = format!("new_ext{i}");
            if !s.extensions.iter().any(|e| e.name == name) {
                s.extensions.push(Extension { name, version: "1.0".into(), schema: "public".into() });
            }
        }
        SafeEdit::Schema(i) => {
            let name = format!("new_schema{i}");
            if !s.schemas.contains(&name) {
                s.schemas.push(name);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_schema_does_not_differ_from_itself(s in schema()) {
        prop_assert!(diff(&s, &s).is_empty());
    }

    #[test]
    fn the_diff_back_mirrors_the_diff_forth(a in schema(), b in schema()) {
        let forth: Vec<Change> = diff(&a, &b).into_iter().map(Change::mirror).collect();
        prop_assert_eq!(sorted(forth), sorted(diff(&b, &a)));
    }

    #[test]
    fn mirroring_twice_is_the_identity(a in schema(), b in schema()) {
        for c in diff(&a, &b) {
            prop_assert_eq!(c.clone().mirror().mirror(), c);
        }
    }

    #[test]
    fn classification_is_total_and_explains_itself(a in schema(), b in schema()) {
        for c in classified(&a, &b) {
            prop_assert!(!c.summary.is_empty());
            if let Compatibility::Breaking { why, .. } = &c.compatibility {
                prop_assert!(why.contains("running release"), "{}", why);
            }
        }
    }

    #[test]
    fn safe_additions_are_all_safe(s in schema(), edits in proptest::collection::vec(safe_edit(), 1..8)) {
        let mut after = s.clone();
        for e in &edits {
            apply(&mut after, e);
        }
        let after = after.normalized();
        for c in classified(&s, &after) {
            prop_assert_eq!(&c.compatibility, &Compatibility::Safe, "{}", c.summary);
        }
    }

    #[test]
    fn dropping_anything_that_exists_is_breaking(s in schema(), which in any::<prop::sample::Index>()) {
        // Dropping a whole table (unless another looks the same: then it
        // may read as a rename, breaking too).
        prop_assume!(!s.tables.is_empty());
        let mut after = s.clone();
        after.tables.remove(which.index(s.tables.len()));
        let changes = classified(&s, &after);
        prop_assert!(!changes.is_empty());
        prop_assert!(changes.iter().all(|c| c.compatibility.is_breaking()));
    }

    #[test]
    fn the_fingerprint_is_the_schema(a in schema(), b in schema()) {
        prop_assert_eq!(a.fingerprint() == b.fingerprint(), a == b);
    }
}
