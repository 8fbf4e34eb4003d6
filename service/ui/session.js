// The token: kept in sessionStorage (this tab only), taken from the sign-in form or once from
// a `#token=` link, and dropped when the API refuses it.

const TOKEN_KEY = "dhub.token";

export const token = () => sessionStorage.getItem(TOKEN_KEY);
export const keepToken = (value) => sessionStorage.setItem(TOKEN_KEY, value);
export const dropToken = () => sessionStorage.removeItem(TOKEN_KEY);

// What an HTTP header can carry (as `dhub` checks): ASCII, spaces and tabs included. A
// pasted curly quote would make every request throw, the page then "reconnecting" for ever.
export const UNCARRIABLE = "The token holds a character no HTTP header can carry (not ASCII, or a " +
  "control character): copy it again.";
export const carriable = (value) => /^[\x20-\x7e\t]+$/.test(value);

// Takes a `#token=` link's token; answers why it was not taken, if it was not.
export function takeFragmentToken() {
  const match = /^#token=([^&]*)/.exec(location.hash);
  if (!match) return undefined;
  // Off the location bar and out of the history before anything else can read it.
  history.replaceState(null, "", location.pathname + location.search);
  let value;
  try {
    value = decodeURIComponent(match[1]).trim();
  } catch {
    return "The link's token was malformed (cut short?): sign in with the token itself.";
  }
  if (!value) return undefined;
  if (!carriable(value)) return UNCARRIABLE;
  keepToken(value);
  return undefined;
}

export class SignedOut extends Error {}
export const MAY_NOT_READ = "This token may not read batches (it lacks the scope batches:read).";

// What a sign-out shows next: the router's, given by the entry module (which imports this
// one, so this one cannot import it back).
let shown = () => {};
export const onSignOut = (render) => { shown = render; };

// What a 401 says, from a call or a stream alike.
export const TOKEN_REFUSED = "The API refused the token (401): sign in again.";

export function signOut(message) {
  dropToken();
  shown(message);
  return new SignedOut(message || "signed out");
}
