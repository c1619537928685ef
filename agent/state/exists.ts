/** File-system presence checks shared by the agent's modules. */

/** True if `p` exists (follows symlinks). */
export async function exists(p: string): Promise<boolean> {
  try {
    await Deno.stat(p);
    return true;
  } catch {
    return false;
  }
}
