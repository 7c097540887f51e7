// A product with its modules, cached by Next ("use cache") under the tags evictd's default rules
// give a product and its modules. The route's parameter is read inside <Suspense> (it is known
// only per request); the cached part is the view of one product.
import { Suspense } from "react";
import { cacheLife, cacheTag } from "next/cache";

import { query } from "../../../lib/db";
import { countLoad } from "../../../lib/loads";

export default function ProductPage({ params }: { params: Promise<{ productId: string }> }) {
  return (
    <Suspense fallback={<p>Loading…</p>}>
      <Product params={params} />
    </Suspense>
  );
}

async function Product({ params }: { params: Promise<{ productId: string }> }) {
  const { productId } = await params;
  return <ProductView productId={productId} />;
}

async function ProductView({ productId }: { productId: string }) {
  "use cache";
  cacheTag(`products:id:${productId}`, `module_content:product:${productId}`);
  cacheLife({ stale: 0, revalidate: 3600, expire: 86400 });
  countLoad(`product:${productId}`);
  const [product] = await query<{ name: string }>("SELECT name FROM products WHERE id = $1", [productId]);
  const modules = await query<{ title: string }>(
    "SELECT title FROM modules WHERE product_id = $1 ORDER BY title",
    [productId],
  );
  return (
    <main>
      <h1 id="name">{product?.name ?? "(no such product)"}</h1>
      <ul id="modules">
        {modules.map((m) => (
          <li key={m.title}>{m.title}</li>
        ))}
      </ul>
    </main>
  );
}
