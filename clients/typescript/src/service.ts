// The application's manual invalidation service, with the surface its code already calls
// (`cacheInvalidation.invalidate…Cache`, `CacheInvalidationUtils.on…`), built on the same tags
// and clear types as the daemon (`rules.json`): replacing the import is the whole migration.

import type { EvictdCache } from "./cache.js";
import { CLEAR_TYPES, DEFAULT_RULES, type ClearType } from "./rules.js";
import type { CacheStats } from "./stats.js";

export interface RelatedCaches {
  products?: boolean;
  expertSessions?: boolean;
  moduleContent?: boolean;
  clientConfigs?: boolean;
  clientId?: string;
  productId?: string;
  moduleId?: string;
}

export interface CacheInvalidation {
  /** One client's products (`products:client:{id}`, `products:all`), or every product's. */
  invalidateJobReadinessProductsCache(clientId?: string): Promise<number>;
  invalidateExpertSessionsCache(productId?: string): Promise<number>;
  invalidateModuleContentCache(moduleId?: string): Promise<number>;
  invalidateClientConfigurationsCache(clientId?: string): Promise<number>;
  /** Every table the rules name, table-wide. */
  invalidatePhase2Cache(): Promise<number>;
  invalidateRelatedCaches(related: RelatedCaches): Promise<number>;
  getCacheInvalidationStats(): Promise<CacheStats>;
}

export interface CacheInvalidationUtils {
  onProductCreated(productId: string, clientId?: string): Promise<number>;
  onExpertSessionModified(productId: string): Promise<number>;
  onModuleContentModified(moduleId: string): Promise<number>;
  onClientConfigModified(clientId: string): Promise<number>;
  onBulkDataImport(): Promise<number>;
}

/** The service over `cache`; each method returns the number of cache entries removed. */
export function createCacheInvalidation(cache: EvictdCache): {
  cacheInvalidation: CacheInvalidation;
  CacheInvalidationUtils: CacheInvalidationUtils;
} {
  const clear = async (type: ClearType, id: string | undefined): Promise<number> => {
    if (id === undefined || id === "") return (await cache.invalidateTable(type.table)).keys;
    return (await cache.invalidate(type.tags.map((t) => t.replace("{}", id)))).keys;
  };
  const clearType = (name: string): ClearType => {
    const type = CLEAR_TYPES[name];
    if (!type) throw new Error(`evictd: unknown clear type ${name}`);
    return type;
  };
  const everything = async (): Promise<number> => {
    let keys = 0;
    for (const rule of DEFAULT_RULES) keys += (await cache.invalidateTable(rule.table)).keys;
    return keys;
  };
  const cacheInvalidation: CacheInvalidation = {
    invalidateJobReadinessProductsCache: (clientId) => clear(clearType("products"), clientId),
    invalidateExpertSessionsCache: (productId) => clear(clearType("expert_sessions"), productId),
    invalidateModuleContentCache: (moduleId) => clear(clearType("module_content"), moduleId),
    invalidateClientConfigurationsCache: (clientId) => clear(clearType("client_configs"), clientId),
    invalidatePhase2Cache: everything,
    async invalidateRelatedCaches(related) {
      let keys = 0;
      if (related.products) keys += await clear(clearType("products"), related.clientId);
      if (related.expertSessions) keys += await clear(clearType("expert_sessions"), related.productId);
      if (related.moduleContent) {
        keys += related.moduleId
          ? await clear(clearType("module_content"), related.moduleId)
          : related.productId
            ? (await cache.invalidate([`module_content:product:${related.productId}`])).keys
            : await clear(clearType("module_content"), undefined);
      }
      if (related.clientConfigs) keys += await clear(clearType("client_configs"), related.clientId);
      if (related.productId && related.products) {
        keys += (await cache.invalidate([`products:id:${related.productId}`])).keys;
      }
      return keys;
    },
    getCacheInvalidationStats: () => cache.stats(),
  };
  const CacheInvalidationUtils: CacheInvalidationUtils = {
    async onProductCreated(productId, clientId) {
      const tags = ["products:all", `products:id:${productId}`];
      if (clientId) tags.push(`products:client:${clientId}`);
      return (await cache.invalidate(tags)).keys;
    },
    async onExpertSessionModified(productId) {
      return (await cache.invalidate([`expert_sessions:product:${productId}`, "expert_sessions:all"])).keys;
    },
    async onModuleContentModified(moduleId) {
      return (await cache.invalidate([`module_content:id:${moduleId}`])).keys;
    },
    async onClientConfigModified(clientId) {
      return (await cache.invalidate([`client_configs:id:${clientId}`, "client_configs:all"])).keys;
    },
    onBulkDataImport: everything,
  };
  return { cacheInvalidation, CacheInvalidationUtils };
}
