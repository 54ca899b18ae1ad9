//! Reads a [`Schema`] from a live database through `pg_catalog`.
//!
//! Read-only: plain `SELECT`s in one `REPEATABLE READ READ ONLY`
//! transaction, so the snapshot is consistent. Objects that belong to an
//! extension (its tables, types) are left out: they come and go with the
//! extension, which is listed itself. Sequences that back identity
//! columns are left out too (the column says `identity`).

use crate::model::*;
use tokio_postgres::Client;

/// Schemas that are PostgreSQL's own.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') \
     AND n.nspname NOT LIKE 'pg_temp_%' AND n.nspname NOT LIKE 'pg_toast_temp_%'";

/// "Not created by an extension": for a `pg_class` row `c`.
const NOT_EXTENSION_CLASS: &str = "NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
     AND d.objid = c.oid AND d.deptype = 'e')";

/// Reads the schema of the database `client` is connected to.
pub async fn snapshot(client: &mut Client) -> Result<Schema, tokio_postgres::Error> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let mut schema = Schema::default();

    for row in tx.query(&format!("SELECT n.nspname FROM pg_namespace n WHERE {SYSTEM_SCHEMAS}"), &[]).await? {
        schema.schemas.push(row.get(0));
    }

    // Tables, then their columns, constraints and indexes by oid.
    let rows = tx
        .query(
            &format!(
                "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_CLASS}"
            ),
            &[],
        )
        .await?;
    let mut oids: Vec<u32> = Vec::new();
    for row in rows {
        oids.push(row.get(0));
        schema.tables.push(Table {
            name: QualifiedName::new(row.get::<_, String>(1), row.get::<_, String>(2)),
            columns: Vec::new(),
            constraints: Vec::new(),
            indexes: Vec::new(),
        });
    }
    let index_of = |oid: u32| oids.iter().position(|o| *o == oid);

    let columns = tx
        .query(
            "SELECT a.attrelid, a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull, \
                    CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END, \
                    a.attidentity::text, \
                    CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END \
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attrelid = ANY($1)",
            &[&oids],
        )
        .await?;
    for row in columns {
        let Some(i) = index_of(row.get(0)) else { continue };
        let identity: String = row.get(5);
        schema.tables[i].columns.push(Column {
            name: row.get(1),
            data_type: row.get(2),
            nullable: row.get(3),
            default: row.get(4),
            identity: match identity.as_str() {
                "a" => Some(Identity::Always),
                "d" => Some(Identity::ByDefault),
                _ => None,
            },
            generated: row.get(6),
        });
    }

    let constraints = tx
        .query(
            "SELECT conrelid, conname, contype::text, pg_get_constraintdef(oid), convalidated \
             FROM pg_constraint WHERE conrelid = ANY($1)",
            &[&oids],
        )
        .await?;
    for row in constraints {
        let Some(i) = index_of(row.get(0)) else { continue };
        let contype: String = row.get(2);
        let Some(kind) = ConstraintKind::from_contype(contype.as_bytes().first().copied().unwrap_or(0)) else {
            continue; // a kind this version does not know (NOT NULL constraints of PostgreSQL 18 are in columns)
        };
        schema.tables[i].constraints.push(Constraint {
            name: row.get(1),
            kind,
            definition: row.get(3),
            validated: row.get(4),
        });
    }

    // Indexes that back a constraint (primary key, unique, exclusion)
    // are described by the constraint.
    let indexes = tx
        .query(
            "SELECT i.indrelid, c.relname, pg_get_indexdef(i.indexrelid), i.indisunique \
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = ANY($1) AND NOT EXISTS (SELECT 1 FROM pg_constraint k \
                 WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid AND k.contype IN ('p', 'u', 'x'))",
            &[&oids],
        )
        .await?;
    for row in indexes {
        let Some(i) = index_of(row.get(0)) else { continue };
        schema.tables[i].indexes.push(Index { name: row.get(1), definition: row.get(2), unique: row.get(3) });
    }

    let sequences = tx
        .query(
            &format!(
                "SELECT n.nspname, c.relname, format_type(s.seqtypid, NULL) FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_sequence s ON s.seqrelid = c.oid \
                 WHERE c.relkind = 'S' AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_CLASS} \
                 AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                     AND d.objid = c.oid AND d.deptype = 'i')"
            ),
            &[],
        )
        .await?;
    for row in sequences {
        schema.sequences.push(Sequence {
            name: QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
            data_type: row.get(2),
        });
    }

    let views = tx
        .query(
            &format!(
                "SELECT n.nspname, c.relname, c.relkind = 'm', pg_get_viewdef(c.oid, true) FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('v', 'm') AND {SYSTEM_SCHEMAS} AND {NOT_EXTENSION_CLASS}"
            ),
            &[],
        )
        .await?;
    for row in views {
        schema.views.push(View {
            name: QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
            materialized: row.get(2),
            definition: row.get(3),
        });
    }

    let enums = tx
        .query(
            &format!(
                "SELECT n.nspname, t.typname, \
                        array(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) \
                 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
                 WHERE t.typtype = 'e' AND {SYSTEM_SCHEMAS} \
                 AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass \
                     AND d.objid = t.oid AND d.deptype = 'e')"
            ),
            &[],
        )
        .await?;
    for row in enums {
        schema.enums.push(EnumType {
            name: QualifiedName::new(row.get::<_, String>(0), row.get::<_, String>(1)),
            labels: row.get(2),
        });
    }

    let extensions = tx
        .query(
            "SELECT e.extname, e.extversion, n.nspname FROM pg_extension e \
             JOIN pg_namespace n ON n.oid = e.extnamespace",
            &[],
        )
        .await?;
    for row in extensions {
        schema.extensions.push(Extension { name: row.get(0), version: row.get(1), schema: row.get(2) });
    }

    tx.commit().await?;
    schema.normalize();
    Ok(schema)
}
