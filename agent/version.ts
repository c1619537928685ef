/** Agent version, reported by AgentService and `flexcapd --version`. */
export const VERSION = "0.1.0";
