/**
 * Per-key async mutex: operations on one capsule run one at a time (a stop never races a
 * save), operations on different capsules run in parallel.
 */

/** Serialises async work per key. */
export class KeyedMutex {
  #tails = new Map<string, Promise<void>>();

  /** Runs `fn` after every earlier `run` with the same key has finished. */
  async run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.#tails.get(key) ?? Promise.resolve();
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const tail = prev.then(() => mine);
    this.#tails.set(key, tail);
    await prev;
    try {
      return await fn();
    } finally {
      release();
      if (this.#tails.get(key) === tail) this.#tails.delete(key);
    }
  }
}
