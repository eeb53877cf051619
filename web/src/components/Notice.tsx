import { ConnectError } from "@connectrpc/connect";
import { classify } from "../client";

/** What to show in place of data that could not be loaded. */
export function Notice({ error, what }: { error: unknown; what: string }) {
  const problem = classify(error);
  if (problem === "unimplemented") {
    return (
      <p className="notice unavailable" data-testid="unavailable">
        {what}: not available on this server (this kfeed does not implement it yet).
      </p>
    );
  }
  if (problem === "down") return <p className="notice error">{what}: the server cannot be reached.</p>;
  if (problem === "unauthenticated") return <p className="notice error">{what}: not allowed with this token.</p>;
  return <p className="notice error">{what}: {ConnectError.from(error).rawMessage}</p>;
}

export function StreamBadge({ state }: { state: string }) {
  return <span className={`badge stream-${state}`} data-testid="stream-state">{state}</span>;
}
