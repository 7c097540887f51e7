// The package runs the daemon's own Lua (detach, drain, stamp): copied from the repository's
// `lua/` at build time, so manual and automatic invalidation are one mechanism, one source.
import { copyFileSync, mkdirSync } from "node:fs";

const from = new URL("../../../lua/", import.meta.url);
const to = new URL("../lua/", import.meta.url);
mkdirSync(to, { recursive: true });
for (const name of ["detach", "drain", "stamp"]) {
  copyFileSync(new URL(`${name}.lua`, from), new URL(`${name}.lua`, to));
}
