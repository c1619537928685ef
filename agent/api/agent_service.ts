/**
 * flexcap.v1.AgentService: what this agent is and what it has room for.
 */
import type { AgentServiceServer } from "../gen/flexcap/v1/agent.ts";
import type { Logger } from "../log.ts";
import type { PeerStatus } from "../migrate/peers.ts";
import { unary } from "./rpc.ts";

/** Agent facts gathered at start plus live counters. */
export interface AgentFacts {
  version: string;
  accelerator: string;
  acceleratorReason: string;
  cpuModel: string;
  qemuVersion: string;
  memoryTotalMib: number;
  memoryAllocatableMib: number;
  nodeName: string;
  committedMib(): number;
  capsules(): number;
  /** Every configured peer's info or error (empty without peering). */
  peers(): Promise<PeerStatus[]>;
}

/** Builds the AgentService implementation. */
export function agentService(facts: AgentFacts, log: Logger): AgentServiceServer {
  return {
    getAgentInfo: unary(log, "GetAgentInfo", () =>
      Promise.resolve({
        version: facts.version,
        accelerator: facts.accelerator,
        acceleratorReason: facts.acceleratorReason,
        cpuModel: facts.cpuModel,
        memoryTotalMib: facts.memoryTotalMib,
        memoryAllocatableMib: facts.memoryAllocatableMib,
        memoryCommittedMib: facts.committedMib(),
        capsules: facts.capsules(),
        qemuVersion: facts.qemuVersion,
        nodeName: facts.nodeName,
      })),
    listPeers: unary(log, "ListPeers", async () => ({
      peers: (await facts.peers()).map((p) => ({
        name: p.name,
        address: p.address,
        info: p.info,
        error: p.error ?? "",
      })),
    })),
  };
}
