// How many times each loader ran in this server process: the end-to-end test reads it to prove
// that nothing is rebuilt that no change touched.
const store = globalThis as unknown as { evictdLoads?: Map<string, number> };

export const loads: Map<string, number> = (store.evictdLoads ??= new Map());

export function countLoad(what: string): void {
  loads.set(what, (loads.get(what) ?? 0) + 1);
}
