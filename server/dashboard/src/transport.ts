// The one place that knows how the page reaches SIRA: the Connect protocol (the server's
// HTTP port, same origin), the bearer token on every call, and "back to sign-in" when
// the server says the token is missing, invalid or expired.
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-web";
import type { DescService } from "@bufbuild/protobuf";
import { currentSession, signOut } from "./auth";

const withBearer: Interceptor = (next) => async (req) => {
  const session = currentSession();
  if (session !== null) req.header.set("Authorization", `Bearer ${session.token}`);
  try {
    return await next(req);
  } catch (err) {
    const error = ConnectError.from(err);
    if (error.code === Code.Unauthenticated) {
      signOut("Your session has expired or is no longer valid. Please sign in again.");
    }
    throw error;
  }
};

export const transport = createConnectTransport({
  baseUrl: window.location.origin,
  useBinaryFormat: true,
  interceptors: [withBearer],
});

export function client<T extends DescService>(service: T): Client<T> {
  return createClient(service, transport);
}
