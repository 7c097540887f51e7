// The daemon's default rules (which tags a table's rows make stale) and the application's clear
// types, read from `rules.json`: one table, kept equal to the daemon's by its test suite.

import { readFileSync } from "node:fs";

export interface TableRule {
  /** `schema.table`, as the daemon names it in `tagts-table:` markers. */
  table: string;
  /** Tag templates: `{column}` is replaced by the row's value. */
  tags: string[];
}

export interface ClearType {
  table: string;
  /** The argument that narrows the clear to one row's tags (`clientId`, …). */
  by: "clientId" | "productId" | "moduleId";
  /** Tags of that row, `{}` standing for its id. */
  tags: string[];
}

interface RulesFile {
  tables: TableRule[];
  clearTypes: Record<string, ClearType>;
}

const file = JSON.parse(
  readFileSync(new URL("../../rules.json", import.meta.url), "utf8"),
) as RulesFile;

export const DEFAULT_RULES: readonly TableRule[] = file.tables;
export const CLEAR_TYPES: Readonly<Record<string, ClearType>> = file.clearTypes;

/** Whether `tag` is one `template` makes (each placeholder standing for a non-empty value). */
function matches(template: string, tag: string): boolean {
  const literal = (part: string) => part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  const pattern = template.split(/\{[^}]*\}/).map(literal).join(".+");
  return new RegExp(`^${pattern}$`, "s").test(tag);
}

/** The tables whose rows make `tag`: their table-wide invalidations make it stale too. */
export function tablesOfTag(tag: string, rules: readonly TableRule[] = DEFAULT_RULES): string[] {
  return rules.filter((r) => r.tags.some((t) => matches(t, tag))).map((r) => r.table);
}

/** What invalidating `table` table-wide reaches, as the daemon does it: its constant tags, and a
 * glob over the tags of each template with placeholders. */
export function tableWide(
  table: string,
  rules: readonly TableRule[] = DEFAULT_RULES,
): { tags: string[]; globs: string[] } {
  const rule = rules.find((r) => r.table === table || r.table === `public.${table}`);
  if (!rule) throw new TypeError(`evictd: no rule for table ${JSON.stringify(table)}`);
  const tags = rule.tags.filter((t) => !t.includes("{"));
  const globs = rule.tags
    .filter((t) => t.includes("{"))
    .map((t) => t.split(/\{[^}]*\}/).map(escapeGlob).join("*"));
  return { tags, globs };
}

/** `text` with Redis glob metacharacters escaped. */
export function escapeGlob(text: string): string {
  return text.replace(/[*?[\]\\]/g, (c) => `\\${c}`);
}
