import type { QueryClient } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { connection, saveToken, token, useStore } from "./client";
import { BacktestsPage } from "./pages/Backtests";
import { MarketPage } from "./pages/Market";
import { MarketsPage } from "./pages/Markets";
import { StatusPage } from "./pages/Status";
import { href, useRoute } from "./router";

function TokenForm({ onSaved, bad }: { onSaved: () => void; bad: boolean }) {
  const [value, setValue] = useState("");
  const submit = (event: FormEvent) => {
    event.preventDefault();
    saveToken(value);
    onSaved();
  };
  return (
    <form className="token-form" onSubmit={submit} data-testid="token-form">
      <p className={bad ? "notice error" : "notice"} data-testid="auth-message">
        {bad
          ? "The server refused this token (wrong, expired, or without the read role). Enter another one."
          : "This server requires a token. Enter a token with the read role; it is kept in this browser."}
      </p>
      <input
        type="password"
        autoComplete="current-password"
        placeholder="bearer token"
        value={value}
        onChange={(e) => setValue(e.target.value)}
        aria-label="token"
      />
      <button type="submit">Use token</button>
    </form>
  );
}

export function App({ queryClient }: { queryClient: QueryClient }) {
  const route = useRoute();
  const state = useStore(connection);
  const current = useStore(token);
  const [generation, setGeneration] = useState(0);
  const page = route[0] ?? "markets";
  const restart = () => {
    connection.set("ok");
    setGeneration((g) => g + 1);
    void queryClient.resetQueries();
  };
  const needsToken = state === "needs-token" || state === "bad-token";
  return (
    <div className="app">
      <header>
        <a className="brand" href={href("markets")}>kfeed</a>
        <nav>
          <a className={page.startsWith("market") ? "active" : ""} href={href("markets")}>Markets</a>
          <a className={page === "backtests" ? "active" : ""} href={href("backtests")}>Backtests</a>
          <a className={page === "status" ? "active" : ""} href={href("status")}>Status</a>
        </nav>
        {current && (
          <button className="link" onClick={() => { saveToken(""); restart(); }}>
            forget token
          </button>
        )}
      </header>
      {state === "down" && (
        <div className="banner error" data-testid="server-down">
          The kfeed server cannot be reached. Retrying… (is <code>kfeed serve --web-listen</code> running?)
          <button onClick={restart}>Retry now</button>
        </div>
      )}
      {needsToken ? (
        <TokenForm onSaved={restart} bad={state === "bad-token"} />
      ) : (
        <main key={generation}>
          {page === "markets" && <MarketsPage />}
          {page === "market" && route[1] && <MarketPage ticker={route[1]} />}
          {page === "backtests" && <BacktestsPage backtestId={route[1]} />}
          {page === "status" && <StatusPage />}
        </main>
      )}
    </div>
  );
}
