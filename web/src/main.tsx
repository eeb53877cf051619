import { TransportProvider } from "@connectrpc/connect-query";
import { QueryCache, QueryClient, QueryClientProvider } from "@tanstack/react-query";
import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";
import { classify, noteError, transport } from "./client";
import "./style.css";

const queryClient = new QueryClient({
  queryCache: new QueryCache({ onError: noteError }),
  defaultOptions: {
    queries: {
      staleTime: 5_000,
      refetchOnWindowFocus: false,
      // Retrying cannot fix a missing RPC or a refused token.
      retry: (failures, error) =>
        failures < 2 && !["unimplemented", "unauthenticated"].includes(classify(error)),
    },
  },
});

createRoot(document.getElementById("root")!).render(
  <StrictMode>
    <TransportProvider transport={transport}>
      <QueryClientProvider client={queryClient}>
        <App queryClient={queryClient} />
      </QueryClientProvider>
    </TransportProvider>
  </StrictMode>,
);
