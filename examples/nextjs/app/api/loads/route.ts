import { connection } from "next/server";

import { loads } from "../../../lib/loads";

export async function GET() {
  await connection();
  return Response.json(Object.fromEntries(loads));
}
