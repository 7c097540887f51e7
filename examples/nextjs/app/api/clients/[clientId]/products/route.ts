// A client's products as JSON, cached by the application through @evictd/cache (`cached`), as
// the team's API routes do. `?sleep=MS` makes the loader dawdle after reading: the race test.
import { connection } from "next/server";

import { cache } from "../../../../../lib/cache";
import { query } from "../../../../../lib/db";
import { countLoad } from "../../../../../lib/loads";

export async function GET(request: Request, { params }: { params: Promise<{ clientId: string }> }) {
  await connection();
  const { clientId } = await params;
  const sleep = Number(new URL(request.url).searchParams.get("sleep") ?? 0);
  const products = await cache.cached(
    `products:list:${clientId}`,
    [`products:client:${clientId}`],
    async () => {
      countLoad(`products:${clientId}`);
      const rows = await query<{ id: string; name: string }>(
        "SELECT id, name FROM products WHERE client_id = $1 ORDER BY id",
        [clientId],
      );
      if (sleep > 0) await new Promise((resolve) => setTimeout(resolve, sleep));
      return rows;
    },
    300,
  );
  return Response.json({ count: products.length, products });
}
