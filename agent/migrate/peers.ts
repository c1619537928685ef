/**
 * This agent's view of its peers: a mutual-TLS client per configured peer. The server's
 * certificate must be issued for the peer's configured name (checked by TLS against the
 * cluster CA, whatever address it is reached at), and ours proves who we are to it.
 */
import * as grpc from "@grpc/grpc-js";
import { Buffer } from "node:buffer";
import { NotFoundError, UnavailableError } from "../errors.ts";
import { type PeerInfo, PeerServiceClient } from "../gen/flexcap/v1/peer.ts";

/** One configured peer. */
export interface PeerConfig {
  name: string;
  address: string;
}

/** Our credentials towards peers. */
export interface PeerTls {
  cert: string;
  key: string;
  ca: string;
}

/** A peer's answer, or why there was none. */
export interface PeerStatus {
  name: string;
  address: string;
  info?: PeerInfo;
  error?: string;
}

const INFO_TIMEOUT_MS = 5_000;

/** Clients for every configured peer, made on first use. */
export class Peers {
  #clients = new Map<string, PeerServiceClient>();

  constructor(private peers: PeerConfig[], private tls: PeerTls) {}

  /** The configured peers. */
  list(): PeerConfig[] {
    return [...this.peers];
  }

  /** The PeerService client for peer `name`. */
  client(name: string): PeerServiceClient {
    const peer = this.peers.find((p) => p.name === name);
    if (!peer) throw new NotFoundError("peer", name);
    let c = this.#clients.get(name);
    if (!c) {
      const read = (p: string) => Buffer.from(Deno.readFileSync(p));
      const creds = grpc.credentials.createSsl(read(this.tls.ca), read(this.tls.key), read(this.tls.cert));
      c = new PeerServiceClient(peer.address, creds, {
        // Verify the peer's certificate against its configured name, not the address we dial.
        "grpc.ssl_target_name_override": peer.name,
        "grpc.default_authority": peer.name,
        "grpc.max_receive_message_length": 16 * 1024 * 1024,
      });
      this.#clients.set(name, c);
    }
    return c;
  }

  /** Asks one peer for its info. */
  async info(name: string): Promise<PeerInfo> {
    const client = this.client(name);
    try {
      const res = await new Promise<{ info?: PeerInfo }>((resolve, reject) =>
        client.getPeerInfo(
          {},
          new grpc.Metadata(),
          { deadline: Date.now() + INFO_TIMEOUT_MS },
          (err, r) => err ? reject(err) : resolve(r),
        )
      );
      if (!res.info) throw new Error("empty answer");
      return res.info;
    } catch (err) {
      throw new UnavailableError(`target_peer: ${name} did not answer: ${(err as Error).message}`);
    }
  }

  /** Asks every peer for its info, in parallel; failures are reported per peer. */
  status(): Promise<PeerStatus[]> {
    return Promise.all(this.peers.map(async (p): Promise<PeerStatus> => {
      try {
        return { ...p, info: await this.info(p.name) };
      } catch (err) {
        return { ...p, error: (err as Error).message };
      }
    }));
  }

  /** Closes every client. */
  close(): void {
    for (const c of this.#clients.values()) c.close();
    this.#clients.clear();
  }
}
