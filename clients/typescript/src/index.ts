export { EvictdCache, InvalidTagError, checkTag } from "./cache.js";
export type { EvictdCacheOptions, InvalidationReport } from "./cache.js";
export { CLEAR_TYPES, DEFAULT_RULES, tableWide, tablesOfTag } from "./rules.js";
export type { ClearType, TableRule } from "./rules.js";
export { cacheStats, hitRate } from "./stats.js";
export type { CacheStats } from "./stats.js";
export { createCacheInvalidation } from "./service.js";
export type { CacheInvalidation, CacheInvalidationUtils, RelatedCaches } from "./service.js";
